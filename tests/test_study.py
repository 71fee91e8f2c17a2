"""`embedkit run CONFIG` and `--config FILE`: stages run in order, finished ones are skipped, bad keys refused."""

from __future__ import annotations

import json

from conftest import ROOT, invoke_cli, run_cli


def test_run_config_end_to_end_then_skips_finished_stages(lite0_store, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    out = tmp_path / "res"
    cfg.write_text(f"""
name: tiny
state: {out}/run_state.json
stages:
  - name: probe
    command: probe
    options: {{store: {lite0_store}, heads: knn, seeds: 1, out: {out}, n_boot: 100, quiet: true}}
  - name: map
    command: view
    options: {{store: {lite0_store}, method: pca, out: {out}/pca.png, quiet: true}}
""")
    first = invoke_cli("run", cfg)
    assert "2 stage(s) run, 0 skipped" in first.stdout
    assert (out / "knn" / "metrics.json").exists() and (out / "pca.png").exists()
    state = json.loads((out / "run_state.json").read_text())["stages"]
    assert [state[s]["status"] for s in ("probe", "map")] == ["done", "done"]
    mtime = (out / "knn" / "metrics.json").stat().st_mtime_ns
    second = invoke_cli("run", cfg)
    assert "0 stage(s) run, 2 skipped" in second.stdout and "[probe] done earlier; skipped" in second.stderr
    assert (out / "knn" / "metrics.json").stat().st_mtime_ns == mtime
    cfg.write_text(cfg.read_text().replace("method: pca", "method: pca, seed: 1"))  # changed options run again
    third = invoke_cli("run", cfg)
    assert "1 stage(s) run, 1 skipped" in third.stdout


def test_config_file_gives_defaults_and_flags_win(lite0_store, tmp_path):
    cfg = tmp_path / "probe.yaml"
    cfg.write_text("heads: logreg\nseeds: 1\nn-boot: 100\nquiet: true\nout: %s\n" % (tmp_path / "a"))
    invoke_cli("probe", lite0_store, "--config", cfg, "--heads", "knn")
    assert (tmp_path / "a" / "knn").is_dir() and not (tmp_path / "a" / "logreg").exists()


def test_unknown_key_names_the_closest_one(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("stages:\n  - command: probe\n    options: {store: x.h5, tets_size: 0.3}\n")
    proc = run_cli("run", cfg, check=False)
    assert proc.returncode == 2
    assert "unknown key 'tets_size'" in proc.stderr and "did you mean 'test_size'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_shipped_configs_name_valid_options():
    """Every stage of every shipped study uses real commands and option names (checked without running)."""
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"mitocheck_demo", "mitocheck_finetune_vs_probe", "livedead_patches",
                                          "oral_cancer_3class", "gpu_dinov2"}
    for c in configs:
        proc = run_cli("run", c, "--dry-run", check=False)
        assert proc.returncode == 0, f"{c.name}: {proc.stderr[-500:]}"
