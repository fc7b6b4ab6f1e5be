"""`--fid-weights X.pt2` loads tensors and a graph of torch operators, never a pickle that can run
code; a network exported for one batch size is run in chunks of it."""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from rapm_core.errors import ConfigError
from rapm_core.evaluate.features import image_features
from rapm_core.evaluate.measures import feature_network
from rapm_testing.helpers import TinyFeatures


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _with_member(src, dst, suffix: str, data: bytes):
    """``src`` with its member ending in ``suffix`` replaced by ``data``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        names = zin.namelist()
        target = next(n for n in names if n.endswith(suffix))
        for name in names:
            zout.writestr(zin.getinfo(name), data if name == target else zin.read(name))
    return dst


def test_a_crafted_pt2_runs_no_code(tmp_path, tiny_features_pt2):
    marker = tmp_path / "payload-ran"
    good = tiny_features_pt2
    crafted = _with_member(good, tmp_path / "crafted.pt2", "data/sample_inputs/model.pt",
                           pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ConfigError, match="crafted.pt2: not a torch.export feature network of tensors only"):
        feature_network(crafted)
    assert not marker.exists(), "the archive's pickle ran"


def test_an_archive_with_pickled_objects_is_refused_unread(tmp_path, tiny_features_pt2):
    good = Path(shutil.copy(tiny_features_pt2, tmp_path / "good.pt2"))  # altered below
    with zipfile.ZipFile(good, "a") as archive:
        prefix = next(n for n in archive.namelist() if "/data/" in n).split("/data/")[0]
        archive.writestr(f"{prefix}/data/constants/custom_obj_0", b"\x80\x04N.")
    with pytest.raises(ConfigError, match="holds pickled Python objects"):
        feature_network(good)


def test_a_network_exported_for_a_fixed_batch_runs_any_batch(tmp_path):
    net = TinyFeatures(0).eval()
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(4, 3, 32, 32, dtype=torch.uint8),)), str(path))
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = net(images).numpy()
    got = image_features(feature_network(path), images)
    assert got.shape == expected.shape and abs(got - expected).max() < 1e-5
