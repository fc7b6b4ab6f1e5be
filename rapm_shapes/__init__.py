"""The embedded default: a procedurally rendered "shapes" domain, a teacher trained on it by the
project's own recipe, and a classifier that measures prompt adherence and domain FID on it, so
the whole pipeline runs and is measurable on a machine with no hub access and no GPU."""
