"""Bad inputs to `python -m kd_mlx.train` and `python -m kd_mlx.data split`: each is refused with exit status 1 and
one line naming the problem, before any compute, and every input and earlier output stays byte-identical.

The world (tiny Kimi-K2 teacher store -> tiny Phi student, CMMLU-format fixture) is test_train's; one short real
run made once is the "earlier output" the resume and run-directory cases must not touch."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

mx = pytest.importorskip("mlx.core")

from test_train import cli_args, world  # noqa: E402,F401  (the same tiny Kimi-K2 -> Phi world)

from kd_mlx.data.cli import main as data_cli  # noqa: E402
from kd_mlx.testing.models import tiny_phi_dir  # noqa: E402
from kd_mlx.train.cli import main as train_cli  # noqa: E402
from kd_mlx.train.model import base_model_fingerprint, check_adapter_base  # noqa: E402
from kd_mlx.utils import KDError  # noqa: E402


def snapshot(*roots: Path) -> dict[str, bytes | str]:
    """Every file (bytes) and link (target) under `roots`."""
    out: dict[str, bytes | str] = {}
    for root in roots:
        root = Path(root)
        if root.is_file():
            out[str(root)] = root.read_bytes()
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if p.is_symlink():
                    out[str(p)] = "-> " + os.readlink(p)
                elif p.is_file():
                    out[str(p)] = p.read_bytes()
    return out


def inputs(world) -> list[Path]:  # noqa: F811
    return [world["student"], world["store"], world["data"], world["splits"]]


def refused(cli, args: list[str], *watched: Path, env: dict | None = None) -> str:
    """Run the CLI; assert exit 1, one line on stderr, the watched paths unchanged; return the message."""
    before = snapshot(*watched)
    r = CliRunner(env=env).invoke(cli, args, catch_exceptions=False)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (r.exit_code, r.output)
    assert snapshot(*watched) == before
    return lines[0][len("error: "):]


def yaml_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def earlier_run(world, tmp_path_factory):  # noqa: F811
    """A finished 2-step run (the earlier output later commands must leave alone)."""
    run = tmp_path_factory.mktemp("earlier") / "run"
    cfg = yaml_file(run.parent, "steps: 2\neval_every: 2\nsave_every: 2\nlora_rank: 4\npad_to: 16\n"
                               "kd_max_positions: 8\nwarmup_steps: 1\n")
    r = CliRunner().invoke(train_cli, cli_args(world, run, "--config", str(cfg)), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return run


# ------------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize("extra, yaml_text, message", [
    (["--learning-rate", "-1"], "", "setting learning_rate must be > 0, got -1.0"),
    (["--learning-rate", "nan"], "", "setting learning_rate must be a finite number, got nan"),
    ([], "lora_rank: 0\n", "setting lora_rank must be >= 1, got 0"),
    ([], "steps: four\n", "setting steps must be an integer, got 'four'"),
    ([], "kd_weight: [1, 2]\n", "setting kd_weight must be a number, got [1, 2]"),
    ([], "stepz: 3\n", "unknown config key(s): stepz"),
    # the contamination guard: a split evaluated anywhere in the run is never trained on, whatever eval_splits says
    ([], "train_split: test\neval_splits: [val]\n", "train_split 'test' is evaluated in this run or after it"),
    ([], "train_split: val\neval_splits: []\n", "train_split 'val' is evaluated in this run or after it"),
    ([], "transfer_split: test\n", "transfer_split 'test' is evaluated in this run or after it"),
])
def test_bad_settings_refused_before_anything_is_written(world, tmp_path, extra, yaml_text, message):  # noqa: F811
    out = tmp_path / "run"
    args = cli_args(world, out, *extra) + (["--config", str(yaml_file(tmp_path, yaml_text))] if yaml_text else [])
    msg = refused(train_cli, args, *inputs(world))
    assert message in msg, msg
    assert not out.exists()


def test_student_vocab_smaller_than_its_tokenizer(world, tmp_path):  # noqa: F811
    small = tiny_phi_dir(tmp_path / "small_vocab", seed=2, vocab_size=20000)
    args = cli_args(world, tmp_path / "run")
    args[args.index("--student") + 1] = str(small)
    msg = refused(train_cli, args, small, *inputs(world)[1:])
    assert msg.startswith(f"student {small} has vocab_size 20000 but its tokenizer has 50295 tokens"), msg
    assert not (tmp_path / "run").exists()


def test_subject_without_enough_dev_rows_found_before_examples(world, tmp_path):  # noqa: F811
    data = Path(shutil.copytree(world["data"], tmp_path / "cmmlu"))
    dev = data / "dev" / "college_mathematics.csv"
    dev.write_text(dev.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")  # header only
    args = cli_args(world, tmp_path / "run")
    args[args.index("--data") + 1] = str(data)
    msg = refused(train_cli, args, data, *inputs(world))
    assert msg.startswith("subject college_mathematics has 0 dev row(s)") and "fewer than the 1 shots" in msg, msg


# ------------------------------------------------------------------------------------------------ run directory


def test_train_into_an_existing_run_without_resume(world, earlier_run, tmp_path):  # noqa: F811
    msg = refused(train_cli, cli_args(world, earlier_run), earlier_run, *inputs(world))
    assert msg == (f"--out {earlier_run} already holds a training run (last checkpoint step_2): continue it with "
                   f"--resume {earlier_run}, or choose a new --out")


def test_train_into_other_things(world, tmp_path):  # noqa: F811
    other = tmp_path / "results"
    other.mkdir()
    (other / "summary.json").write_text("{}")
    msg = refused(train_cli, cli_args(world, other), other, *inputs(world))
    assert msg == f"--out {other} holds 1 entry (summary.json): choose a new or empty run directory"
    msg = refused(train_cli, cli_args(world, world["store"] / "run"), *inputs(world))
    assert msg.startswith(f"--out {world['store'] / 'run'} overlaps the store input")
    (tmp_path / "file").write_text("x")
    msg = refused(train_cli, cli_args(world, tmp_path / "file"), tmp_path / "file", *inputs(world))
    assert msg == f"--out {tmp_path / 'file'} is a file, not a run directory"


def test_resume_with_other_settings_or_a_broken_config(world, earlier_run, tmp_path):  # noqa: F811
    msg = refused(train_cli, ["--resume", str(earlier_run), "--learning-rate", "0.5", "--no-progress"], earlier_run,
                  *inputs(world))
    assert msg.startswith(f"--resume {earlier_run}: learning_rate is 0.5 but the run was made with 0.0001"), msg
    broken = Path(shutil.copytree(earlier_run, tmp_path / "broken", symlinks=True))
    (broken / "config.json").write_text('{"steps": ')
    msg = refused(train_cli, ["--resume", str(broken), "--no-progress"], broken, *inputs(world))
    assert msg.startswith(f"cannot resume {broken}: {broken / 'config.json'} is not valid JSON"), msg
    cfg = json.loads((earlier_run / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "steps": "four"}))
    msg = refused(train_cli, ["--resume", str(broken), "--no-progress"], broken, *inputs(world))
    assert msg == f"cannot resume {broken}: {broken / 'config.json'}: setting steps must be an integer, got 'four'"
    msg = refused(train_cli, ["--resume", str(tmp_path / "nothing"), "--no-progress"], *inputs(world))
    assert msg.startswith(f"cannot resume {tmp_path / 'nothing'}: no config.json there")


def test_resume_refuses_adapters_of_another_base_model(world, earlier_run, tmp_path):  # noqa: F811
    # a student of the same shape with other weights: another hash, and its adapters are refused
    other = tiny_phi_dir(tmp_path / "other_student", seed=3)
    assert base_model_fingerprint(other) != base_model_fingerprint(world["student"])
    with pytest.raises(KDError, match="trained on another base model"):
        check_adapter_base(earlier_run / "best", other)
    check_adapter_base(earlier_run / "best", world["student"])
    # the run's student replaced in place by other weights of the same shape: resume refuses
    student = Path(shutil.copytree(world["student"], tmp_path / "student"))
    run = Path(shutil.copytree(earlier_run, tmp_path / "run", symlinks=True))
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "student": str(student)}))
    for name in ("checkpoints/step_2", "best"):
        f = run / name / "adapter_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "model": str(student)}))
    for f in other.glob("*.safetensors"):
        shutil.copy(f, student / f.name)
    msg = refused(train_cli, ["--resume", str(run), "--steps", "3", "--no-progress"], run, student,
                  *inputs(world)[1:])
    assert "were trained on another base model" in msg and "use the student they were trained from" in msg, msg


# ------------------------------------------------------------------------------------------------ data split


def test_split_refuses_to_replace_other_splits_and_directories(world, tmp_path):  # noqa: F811
    out = tmp_path / "splits.json"
    base = ["split", "--data", str(world["data"]), "--out", str(out), "--val", "0.2", "--test", "0.2"]
    r = CliRunner().invoke(data_cli, base, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(data_cli, base, catch_exceptions=False)  # the same splits again: nothing changes
    assert r.exit_code == 0, r.output
    msg = refused(data_cli, base + ["--seed", "1"], out, world["data"])
    assert msg.startswith(f"{out} exists with other splits (") and "pass --overwrite" in msg, msg
    r = CliRunner().invoke(data_cli, base + ["--seed", "1", "--overwrite"], catch_exceptions=False)
    assert r.exit_code == 0 and json.loads(out.read_text())["seed"] == 1
    msg = refused(data_cli, ["split", "--data", str(world["data"]), "--out", str(tmp_path)], world["data"])
    assert msg == f"--out {tmp_path} is a directory: give the file to write, e.g. {tmp_path / 'splits.json'}"
    inside = world["data"] / "test" / "splits.json"
    msg = refused(data_cli, ["split", "--data", str(world["data"]), "--out", str(inside)], world["data"])
    assert msg == f"--out {inside} is inside the data's own files: write splits.json elsewhere"


def test_mistyped_local_data_path_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()  # `data/cmmlu_typo` has the owner/name shape, but data/ is a local directory
    r = CliRunner(env={"HF_HUB_OFFLINE": "1"}).invoke(data_cli, ["split", "--data", "data/cmmlu_typo", "--out",
                                                                 "s.json"], catch_exceptions=False)
    assert r.exit_code == 1
    assert r.stderr.strip() == ("error: CMMLU data not found: data/cmmlu_typo (a directory with dev/ and test/, "
                                "a zip, or a hub id)")
    assert not Path("s.json").exists()
