"""``rapm fid-stats``: the real side of Inception FID, computed once from a folder of real images.

No flow run: one pass of the feature network over a folder, in this process. The .npz holds
``mu`` and ``sigma`` (pytorch-fid's and torch-fidelity's key names, so it is usable elsewhere)
plus the image count, the feature network's sha256 and the image size, which ``rapm evaluate
--fid-reference`` checks against its own.
"""

from __future__ import annotations


from pydantic import Field

from flows.cli_model import add_model_arguments, model_from_args
from rapm_core.config import Device, StrictModel
from rapm_core.errors import ConfigError


class FidStatsConfig(StrictModel):
    """Inception FID reference statistics (mu, sigma) of a folder of real images, e.g. COCO-2014 val."""

    images: str = Field(description="folder of real images (png/jpg/webp)")
    out: str = Field(description=".npz to write (path or fsspec URL)")
    fid_weights: str = Field(description="the feature network evaluation uses: torch-fidelity's Inception "
                                         "weights (.pth) or a torch.export'ed network (.pt2)")
    size: int = Field(ge=1, description="the generated images' size: real images are centre-cropped square and "
                                        "resized to SIZE×SIZE, as evaluation resizes them")
    batch_size: int = Field(50, ge=1, description="images per feature batch (speed only)")
    device: Device = Field("auto", description="compute device")


def compute(config: FidStatsConfig):
    """The folder's :class:`rapm_core.evaluate.features.GaussianStats`, written to ``config.out``."""
    from rapm_core.evaluate import features, measures  # torch: only when the command runs
    from rapm_core.teacher import resolve_device
    from storage.hashing import file_sha256
    from storage.urls import write_bytes

    if not config.out.endswith(".npz"):
        raise ConfigError(f"--out {config.out}: name the statistics file *.npz")
    features.image_files(config.images)  # before the network loads
    net = measures.feature_network(config.fid_weights).to(resolve_device(config.device))
    stats = features.folder_stats(config.images, net, (config.size, config.size), file_sha256(config.fid_weights),
                                  config.batch_size)
    write_bytes(config.out, stats.npz_bytes())
    return stats


def configure(parser) -> None:
    parser.description = FidStatsConfig.__doc__
    add_model_arguments(parser, FidStatsConfig)
    parser.set_defaults(func=_cli)


def _cli(args) -> int:
    stats = compute(config := model_from_args(FidStatsConfig, args))
    print(f"{config.out}: mu/sigma of {stats.count} images from {config.images} "
          f"({stats.mu.shape[0]} features, {config.size}×{config.size})")
    return 0
