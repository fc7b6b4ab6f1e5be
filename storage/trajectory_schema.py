"""What a trajectory store is: its attributes as one typed, frozen model.

A store's Zarr attributes are exactly ``StoreSchema.model_dump(mode="json")``; readers get the
model back (``TrajectoryStore.schema``), never a dict of string keys. The identity fields
(:class:`StoreIdentity`) name what the stored trajectories contain: two configs with the same
identity make bit-identical stores, so an existing store is resumed only by a run with the same
identity, and ``config_hash`` is their hash. The rest records provenance (where the prompts
came from, the whole stage config, the codec) and does not change what is computed.

Stores written before a field existed stay readable: such fields have defaults, and unknown
attributes of a newer writer are kept (``extra="allow"``) rather than refused.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from storage.hashing import config_hash

SCHEMA_VERSION = 1
STORE_DTYPES = ("float16", "float32")
# Chosen by measurement (benchmarks/trajectory_store_codecs.py, RESULTS.md "Codec"): zstd-5 with
# byte shuffle is the best ratio per CPU second among the lossless codecs tried on latents.
POSITIONS_CODEC = {"cname": "zstd", "clevel": 5, "shuffle": "shuffle"}
SEED_RULE = "seed_i = sha256('rapm-trajectory:{seed}:{i}')[:8] little-endian & (2**63-1)"
# Readable names for identity fields in mismatch messages.
TeacherKind = Literal["sd15", "sdxl", "sd3"]  # the pipeline family a teacher belongs to
_OPTIONAL_IDENTITY = ("max_sequence_length",)  # identity fields of some teacher kinds only
_FIELD_NAMES = {"prompts_hash": "prompt set", "num": "number of trajectories", "teacher_revision": "teacher revision"}


class PromptSource(BaseModel):
    """The prompt store a trajectory store was generated from (provenance, not identity)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    path: str
    split: str = "train"
    limit: int | None = None
    samples_per_prompt: int = 1
    config_hash: str | None = None


class StoreIdentity(BaseModel):
    """Every field that changes what a stored trajectory contains."""

    model_config = ConfigDict(frozen=True, extra="allow")

    schema_version: int = SCHEMA_VERSION
    teacher: str
    teacher_revision: str | None
    kind: TeacherKind
    scheduler_config: dict[str, Any]
    num_slots: int
    steps_per_slot: int
    guidance: float
    seed: int
    compute_dtype: str
    store_dtype: Literal["float16", "float32"]
    prompts_hash: str
    num: int
    latent_shape: tuple[int, int, int]
    # SD3-class teachers only (their T5 token count changes the encoding); None elsewhere, and then
    # left out of the identity, so stores written before it existed keep their hash.
    max_sequence_length: int | None = None

    @property
    def positions_per_trajectory(self) -> int:
        return self.num_slots * self.steps_per_slot + 1

    def identity(self) -> dict[str, Any]:
        """The identity fields as JSON; diffusers' bookkeeping keys (``_class_name``…) don't count."""
        ident = {name: getattr(self, name) for name in StoreIdentity.model_fields
                 if not (name in _OPTIONAL_IDENTITY and getattr(self, name) is None)}
        ident["scheduler_config"] = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        ident["latent_shape"] = list(self.latent_shape)
        return ident

    def identity_hash(self) -> str:
        return config_hash(self.identity())


class StoreSchema(StoreIdentity):
    """A trajectory store's attributes: its identity plus provenance."""

    embed_dtype: str = "float32"
    teacher_fingerprint: str | None = None
    # The grid's levels: DDIM timesteps (ints) or a flow teacher's σ (floats).
    fine_timesteps: list[int | float] | None = None
    coarse_timesteps: list[int | float] | None = None
    prompt_store: PromptSource | None = None
    seed_rule: str = SEED_RULE
    created_by: str | None = None
    config: dict[str, Any] | None = None
    positions_codec: dict[str, Any] = POSITIONS_CODEC
    # CRC32C per chunk (zarr's Crc32cCodec): a flipped byte fails the read instead of decoding
    # to wrong latents. Stores written before it existed carry none.
    chunk_checksums: bool = False
    config_hash: str = ""

    def finalised(self) -> "StoreSchema":
        """This schema with ``config_hash`` set from its identity (what a new store records)."""
        return self.model_copy(update={"config_hash": self.identity_hash()})

    def attributes(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)


def identity_mismatch(path: str, stored: StoreIdentity, wanted: dict[str, Any]) -> str | None:
    """Why the store at ``path`` cannot be resumed by a run wanting ``wanted`` (identity fields,
    possibly only some of them: before a teacher loads, its kind and shapes are unknown), or None."""
    have = stored.identity()
    if "scheduler_config" in wanted:
        wanted = {**wanted, "scheduler_config": {k: v for k, v in wanted["scheduler_config"].items()
                                                 if not k.startswith("_")}}
    if "latent_shape" in wanted:
        wanted = {**wanted, "latent_shape": list(wanted["latent_shape"])}
    diffs = []
    for key in StoreIdentity.model_fields:
        if key not in wanted or have.get(key) == wanted[key] or (key in _OPTIONAL_IDENTITY and key not in have):
            continue
        name = _FIELD_NAMES.get(key, key)
        if key in ("scheduler_config", "prompts_hash"):
            diffs.append(f"{name} differs")
        else:
            diffs.append(f"{name}: store has {have.get(key)!r}, this run wants {wanted[key]!r}")
    if not diffs:
        return None
    return (f"{path}: existing trajectory store was made with a different config ({'; '.join(diffs)}); "
            f"use another --out, or remove that store to regenerate it")
