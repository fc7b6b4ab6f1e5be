"""The time-curves benchmark's bookkeeping: equal total time (Stage A included) and its plots."""

import pytest

from rapm_testing.helpers import load_benchmark


@pytest.fixture(scope="module")
def curves():
    return load_benchmark("time_curves.py", "time_curves_benchmark")


def point(method, n, iterations, passes, total_s, fid, seed=0):
    return {"method": method, "n": n, "seed": seed, "iterations": iterations, "passes": passes, "train_s": total_s - 100,
            "stage_a_s": 100.0, "total_s": total_s, "domain_fid_to_teacher": fid, "domain_fid": fid + 1,
            "psnr": 30 - fid / 10, "latent_mse": fid / 100}


def test_equal_time_compares_each_method_at_its_last_checkpoint_within_the_fastest_runs_total(curves, tmp_path):
    # RAPM (cheap passes) ends at 200 s; the peers' later, better checkpoints are past that budget
    points = [point("rapm", 4, 50, 200, 150, 12.0), point("rapm", 4, 100, 400, 200, 10.0),
              point("pcm", 4, 100, 100, 180, 14.0), point("pcm", 4, 200, 200, 260, 8.0),
              point("lcm", 4, 100, 100, 210, 20.0), point("lcm", 4, 200, 200, 320, 9.0)]
    line = curves.equal_time(points)
    assert "within 200 s total" in line
    assert "RAPM 10.00 FID to teacher, 29.00 dB (400 passes, 200 s)" in line
    assert "PCM 14.00 FID to teacher, 28.60 dB (100 passes, 180 s)" in line and "LCM no checkpoint yet" in line
    # two seeds: each checkpoint's total seconds is their mean, and the cell their interval
    second = [point("rapm", 4, 50, 200, 170, 14.0, seed=1), point("rapm", 4, 100, 400, 240, 12.0, seed=1),
              point("pcm", 4, 100, 100, 200, 12.0, seed=1), point("pcm", 4, 200, 200, 280, 6.0, seed=1),
              point("lcm", 4, 100, 100, 230, 20.0, seed=1), point("lcm", 4, 200, 200, 340, 9.0, seed=1)]
    line = curves.equal_time(points + second)
    assert "within 220 s total" in line and "RAPM 11.00 ± 1.41" in line and "(400 passes, 220 s)" in line
    assert "PCM 13.00 ± 1.41" in line and "(100 passes, 190 s)" in line and "LCM 20.00 ± 0.00" in line
    # two seeds: the curve averages each checkpoint over them
    xs, values = curves.curves(points + [point("rapm", 4, 50, 200, 170, 14.0, seed=1)], "total_s")[("rapm", 4)]
    assert xs[0] == pytest.approx(160.0) and values["domain_fid_to_teacher"][0] == [12.0, 14.0]
    teachers = {4: [{"teacher_ddim": {"label": "teacher DDIM 4 steps", "domain_fid_to_teacher": 16.0,
                                      "domain_fid": 17.0, "psnr": 28.0, "latent_mse": 0.05}}]}
    out = tmp_path / "curve.png"
    curves.plot(points, "total_s", "total seconds", out, teachers)
    assert out.stat().st_size > 0
    table = curves.final_table(points, {4: 100.0}, teachers)
    assert "| 4 | RAPM | 400 | 100 | 100 | 200 | 10.00 |" in table and "| 4 | teacher DDIM 4 steps |" in table


def test_the_report_is_rebuilt_from_the_saved_result(curves, tmp_path):
    import json

    points = [point("rapm", 2, 100, 200, 150, 12.0), point("pcm", 2, 100, 100, 180, 14.0)]
    teachers = {2: [{"teacher_ddim": {"label": "teacher DDIM 2 steps", "domain_fid_to_teacher": 90.0,
                                      "domain_fid": 78.0, "psnr": 23.5, "latent_mse": 0.45}}]}
    args = {"eval_fraction": 0.2, "guidance": 4.0, "seeds": [0], "passes": 200, "points": 1, "num_images": 16}
    saved = tmp_path / "time_curves.json"
    saved.write_text(json.dumps({"stage_a_s": {2: 100.0, 4: 90.0}, "points": points, "teachers": teachers, "args": args,
                                 "machine": "m", "command": "c", "seconds": 5.0}))
    result = curves.load_result(saved)  # JSON's string keys back to N
    assert result["stage_a_s"] == {2: 100.0, 4: 90.0} and set(result["teachers"]) == {2}
    text = curves.report(result)
    assert text.startswith(curves.SECTION) and "| 2 | RAPM | 200 | 100 | 50 | 150 | 12.00 |" in text
    assert "N = 2, within 150 s total: RAPM 12.00" in text


def test_ranks_are_curves_of_their_own_and_the_default_rank_keeps_its_runs(curves, tmp_path):
    import json

    from rapm_core.distill.config import TrainingConfig

    # the default rank is the distill config's, and its series keeps the name runs had before --ranks
    assert curves.DEFAULT_RANK == TrainingConfig().rank
    assert curves.series("rapm") == curves.series("rapm", curves.DEFAULT_RANK) == "rapm"
    assert curves.series("rapm", 16) == "rapm-r16" and curves.series_label("rapm-r16") == "RAPM rank 16"
    points = [point("rapm", 4, 100, 400, 200, 10.0), {**point("rapm-r16", 4, 100, 400, 210, 7.0), "rank": 16},
              {**point("rapm-r4", 4, 100, 400, 205, 8.0), "rank": 4}, point("pcm", 4, 100, 100, 180, 14.0)]
    assert curves.names(points) == ["rapm", "rapm-r4", "rapm-r16", "pcm"]
    table = curves.final_table(points, {4: 100.0}, {4: [{}]})
    assert "| 4 | RAPM rank 4 | 400 | 100 | 105 | 205 | 8.00 |" in table
    assert table.index("RAPM rank 4") < table.index("RAPM rank 16") < table.index("| PCM |")
    line = curves.equal_time(points)
    assert "within 180 s total" in line and "RAPM rank 16 no checkpoint yet" in line
    # the ranks are recorded with the run and reported from the saved result
    args = {"eval_fraction": 0.2, "guidance": 4.0, "seeds": [0], "passes": 400, "points": 1, "num_images": 16,
            "ranks": [1, 4, 16]}
    (tmp_path / "time_curves.json").write_text(json.dumps({
        "stage_a_s": {4: 100.0}, "points": points, "args": args, "machine": "m", "command": "c", "seconds": 5.0,
        "teachers": {4: [{"teacher_ddim": {"label": "teacher DDIM 4 steps", "domain_fid_to_teacher": 16.0,
                                           "domain_fid": 17.0, "psnr": 28.0, "latent_mse": 0.05}}]}}))
    plots = tmp_path / "plots" / "new"  # a plots dir that does not exist yet is made
    assert curves.main(["--work", str(tmp_path), "--report-only", "--plots", str(plots)]) == 0
    text = curves.report(curves.load_result(tmp_path / "time_curves.json"))
    assert "RAPM's LoRA rank 1, 4, 16 (the rest rank 1)" in text and "| 4 | RAPM rank 16 | 400 |" in text
    assert (plots / curves.PNG["passes"]).stat().st_size > 0


def test_peer_ranks_give_the_peers_curves_of_their_own(curves):
    import argparse

    args = argparse.Namespace(ranks=[1, 4], peer_ranks=[4])
    assert curves.ranks("rapm", args) == [1, 4] and curves.ranks("pcm", args) == [4]
    assert curves.ranks("pcm", argparse.Namespace(ranks=[1, 4], peer_ranks=None)) == [curves.DEFAULT_RANK]
    assert curves.series("pcm", 4) == "pcm-r4" and curves.series_label("pcm-r4") == "PCM rank 4"
    points = [{**point("pcm-r4", 4, 100, 100, 180, 9.0), "rank": 4}, point("pcm", 4, 100, 100, 180, 14.0),
              {**point("rapm-r4", 4, 100, 400, 205, 8.0), "rank": 4}]
    assert curves.names(points) == ["rapm-r4", "pcm", "pcm-r4"]
    assert "| 4 | PCM rank 4 | 100 |" in curves.final_table(points, {4: 100.0}, {4: [{}]})
