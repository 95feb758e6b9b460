"""Benchmark: which distillation recipe works? Held-out accuracy on the demo's controlled task, arm by arm.

    python -m kd_mlx demo --out demo_out                                       # task, splits, trained teacher
    nice -n 5 python benchmarks/kd_effect.py --demo demo_out --seeds 0,1,2     # recipe, transfer0, ce
    python benchmarks/kd_effect.py --demo demo_out --arms recipe,ce --arm "lr1e-2:learning_rate=0.01"

Every arm trains a fresh random-init tiny Phi student (seed-dependent init and batch order) on the SAME training
questions (the demo's train split) through kd_mlx.train's own loop (`prepare` once per store, `train_prepared` per
arm) and is scored on the demo's held-out test split by kd_mlx.eval (official protocol, the adapters of the
LAST step, so no arm is picked by a test-set peek). An arm is the demo recipe (`kd_mlx.demo.TRAIN_CONFIG` over
`kd_mlx.train` DEFAULTS) with a few keys changed (`ARMS`); all arms share steps, batch size and data unless the
arm's name says otherwise. Arms that need token-level targets use a store dumped with `--positions question` (made
once under DEMO/kd_effect/); transfer arms use a store that also holds unlabelled transfer questions (below).
Prints mean ± std over seeds, the teacher's test accuracy, wall time and peak memory per arm; appends every run
to OUT/kd_effect.jsonl as it finishes and writes the table to OUT/kd_effect.json.

Transfer set: the demo writes one (`task/transfer/`, Answer empty, `transfer_factor` x the train split) and the
`recipe` arm trains on it the way the demo does (`transfer_split: transfer`: teacher terms only on those questions,
gold CE on the train split); `transfer0` is the same recipe without it. `transfer1x`/`2x`/`4x` copy the task with a
new transfer set of that size (`kd_mlx.demo.write_transfer_task`: another stream of the generator, any question
equal to a dev/test one dropped, train/val/test unchanged) and dump it once under OUT/.

Measured 2026-11-30 (Linux x86_64, 2 cores, MLX CPU + OpenBLAS, OPENBLAS_NUM_THREADS=1; the machine was shared
with other jobs at load 4-14, so one 150-step run took 107-1,311 s). Every arm: 150 steps of 16 questions,
answer-KL T=2 + 0.5 x gold CE over A-D + 0.1 x token KD at the answer position, full fine-tuning, AdamW constant
after 10 warm-up steps; 2 subjects x 300 questions: train 360 / val 60 / test 180; one question = 0.56 points.
Held-out test accuracy (%) per student seed (0 / 1 / 2), last-step adapters.

(1) The demo as it is (teacher trained on 2,000 questions per subject of its own, none in the task; majority task,
seed 0 demo: teacher 81.7% test; student baselines 22.8 / 19.4 / 25.0):

    python benchmarks/kd_effect.py --demo DEMO --seeds 0,1,2 --arms ce,recipe,transfer4x,transfer1x
    python benchmarks/kd_effect.py --demo DEMO --seeds 0,1,2 --arms answer_kl_T1,recipe_ce1      (machine idle)

    majority task, teacher 81.7         seed 0   seed 1   seed 2   mean
      gold CE only (360 labels)           80.0     83.3     74.4     79.2
      recipe (the demo default)           70.6     74.4     66.1     70.4   = 0.86 x teacher, 81% of the gap
      recipe + 1x transfer set            66.7     70.0     74.4     70.4   (720 questions)
      recipe + 4x transfer set            68.3     68.9     63.9     67.0   (1,800 questions, same 150 steps)
      recipe, CE weight 1 (recipe_ce1)    77.8     75.0     65.0     72.6   (missing task: 60.2 vs 62.0, below)
      answer-KL only, T=1 (answer_kl_T1)  66.1     65.0     65.0     65.4

The `--task missing` demo (seed 0; the default recipe and teacher settings, not tuned on it): teacher 83.9 |
baseline 27.8 | distilled 72.2 (0.86 x the teacher, 80% of the gap).
Reading: with a teacher that knows more than the 360 labels teach (81.7% vs the 61% of a teacher trained on the
same 360 questions, below), distillation closes ~80% of the gap on both skills, but gold-label CE still beats it by
~9 points: this student learns the skill from 360 gold labels (79%) nearly as well as the teacher does from 4,000
(82%), so imitating the teacher's distribution (its 18% of errors included) costs more than it gives; the
"recipe >= gold CE + 10" target is NOT met. A transfer set of teacher-labelled questions does not help at equal
steps (1x: 70.4, 4x: 67.0, vs 70.4 without): with 4x every question is seen 1.3 times instead of 6.7, and its
labels are the teacher's. What does help: the teacher's attention (benchmarks/kd_attention.py, same demo, 3 seeds):
the recipe + KL toward the teacher's answer-position attention over the common byte segments, weight 1, reaches
78.0 (+7.6 on 3 of 3 seeds; toward the untrained teacher's attention: 67.4), within noise of gold CE.
More gold CE in the recipe (weight 1 instead of 0.5) is +2.2 on average (seed 2 unchanged); the teacher alone at
T=1 (no CE) gives 65.4. Where labels are few, distillation does beat gold CE: section (2). CE weight 1 on the
missing task (3 seeds, machine idle): 64.4 / 58.9 / 57.2 (60.2) vs the recipe's 72.2 / 57.2 / 56.7 (62.0): the
+2.2 on the majority task does not carry over, so the default keeps 0.5.

(2) Scarce labels, the setting distillation is for (`--labels 20`: 20 gold-labelled train questions per subject, 40
in all, the rest of the train split unused; transfer sets of 1x / 4x / 16x those 40, answers empty, labelled by the
teacher; same 150 steps of 16 for every arm; two runs at a time, OPENBLAS_NUM_THREADS=1, KD runs 130-170 s, CE
37-46 s, peak RSS 0.55-0.58 GiB):

    python benchmarks/kd_effect.py --demo DEMO --seeds 0,1,2 --labels 20 \
        --arms ce,transfer0,transfer1x,transfer4x,transfer16x

    majority task, teacher 81.7         seed 0   seed 1   seed 2   mean   gap closed
      gold CE only (40 labels)            52.8     48.9     49.4     50.4   47%
      recipe, no transfer set             64.4     60.6     51.1     58.7   61%
      recipe + 1x transfer (40)           59.4     58.9     60.6     59.6   63%
      recipe + 4x transfer (160)          65.0     53.9     60.0     59.6   63%
      recipe + 16x transfer (640)         65.6     69.4     68.9     68.0   77%   (+17.6 over gold CE, 3/3 seeds)
    missing task, teacher 83.9
      gold CE only (40 labels)            41.1     36.7     32.8     36.9   21%
      recipe, no transfer set             37.2     38.9     47.2     41.1   28%
      recipe + 1x transfer (40)           52.2     50.6     47.2     50.0   43%
      recipe + 4x transfer (160)          62.8     61.7     53.9     59.4   59%   (+22.6 over gold CE, 3/3 seeds)
      recipe + 16x transfer (640)         44.4     58.9     56.1     53.1   48%   (+16.3; seed 0 only +3.3)

    twice the steps (300 x 16), same settings otherwise (arms given with --arm ...,steps_x=2):
      majority: gold CE 52.8 / 47.8 / 47.8 (49.4); recipe + 16x 66.1 / 71.7 / 73.9 (70.6, 81% of the gap)
      missing:  gold CE 37.8 / 35.6 / 35.0 (36.1); recipe + 16x 51.1 / 60.0 / 64.4 (58.5, 57% of the gap)

Reading: when labels are few, the teacher's labels on unlabelled questions are what distillation adds: the recipe
with a transfer set beats gold CE by 16-23 points on both skills (neither was tuned for this setting). At 150 steps
a bigger transfer set is not always better (missing: 4x 59.4, 16x 53.1; 150 x 16 samples see each of 680 questions
3.5 times); at 300 steps the 16x set is +21 / +22 over gold CE (which does not improve with more steps) and closes
81% / 57% of the gap on the two skills.

(2b) Token-level KD with a teacher that has token-level knowledge (the demo with preset teacher_lm_weight 1.0: the
teacher also learns the prompt's next tokens; same task and splits as (1); teacher 86.7% test, 91.7% val; its
set-up took 826 s instead of 62 s: the 163,840-way LM head at 16 positions per row), the recipe as in (1) and the
recipe + token KD at every question position (weight 0.1, store dumped with --positions question: 30,698 rows for
420 questions, 264 s; each such run 845-904 s vs 140 s answer-only, two jobs on the 2 cores):

    python -c "from kd_mlx.demo import run_demo; run_demo('DEMO_LM', preset={'teacher_lm_weight': 1.0})"
    python benchmarks/kd_effect.py --demo DEMO_LM --seeds 0,1,2 --arms recipe,recipe+tok0.1

    teacher 86.7                        seed 0   seed 1   seed 2   mean
      recipe                              77.8     71.7     75.6     75.0
      recipe + token KD 0.1 (question)    84.4     70.0     71.7     75.4   (+6.7 / -1.7 / -3.9)

Reading: a better teacher lifts the recipe (75.0 vs 70.4 with the 81.7% teacher); token KD over the question text
does not add reliably on top of answer-KL (one seed +6.7, two below; a guess, not measured: the skill is decided at
the answer position and the question text's next tokens say little about it). recipe+tok0.5 was not run (~15 min a
run).

(3) The recipe search (demo directories whose teacher was trained on the same 360 questions: majority teacher
61.1%, missing 58.9%; baselines majority 22.8 / 19.4 / 25.0, missing 27.8 / 21.1 / 24.4; "t4" = a 4x transfer
set):

    majority task                       seed 0   seed 1   seed 2   mean
      t4, lr 3e-3                         52.8     39.4     19.4     37.2   (seed 2: validation 25.0% from step 50)
      t4, lr 1e-2, cosine to 0.1           -       32.8      -              (validation 31.7% at every evaluation)
      t4, lr 3e-3, answer-KL at T=1        -        -       38.9
      t4, lr 1e-3                         68.3     62.8     50.6     60.6
      gold CE only, lr 1e-3, no transfer  80.0     83.3     74.4     79.2
      no transfer set, lr 1e-3            71.1     65.0     54.4     63.5
    missing task                        seed 0   seed 1   seed 2   mean
      t4, lr 3e-3                         32.2     21.1     22.2     25.2
      t4, lr 3e-3, answer-KL at T=1        -        -       41.7
      t4, lr 1e-3                         52.8     24.4     50.6     42.6   (seed 1: validation stays near chance)
      no transfer set, lr 1e-3            58.3     55.0     48.3     53.9

Reading: the learning rate was the failure. At 3e-3 one student seed per task never leaves a constant answer
(validation accuracy flat at 20-31.7% from step 25-50); at 1e-3 the same seeds learn (majority seed 2: 19.4 -> 50.6)
and the recipe carries over to the second skill on 3 of 3 seeds.
"""

from __future__ import annotations

import json
import platform
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import click
import mlx.core as mx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kd_mlx.demo import PRESETS, TRAIN_CONFIG, model_bytes, python_m, run_command, write_transfer_task  # noqa: E402
from kd_mlx.eval import evaluate_model, load_eval_model, select_questions  # noqa: E402
from kd_mlx.store import TopKStore  # noqa: E402
from kd_mlx.testing.models import tiny_phi_dir  # noqa: E402
from kd_mlx.train.run import DEFAULTS, prepare, train_prepared  # noqa: E402

# arm -> keys changed from the demo recipe. "store": which store the arm reads (answer | question | transferNx).
ARMS: dict[str, dict] = {
    "recipe": {},  # as the demo trains: its transfer set included when the demo has one
    "transfer0": {"transfer_split": None},  # the recipe without the transfer set
    # gold labels only: the train split (a transfer set has none)
    "ce": {"answer_weight": 0.0, "kd_weight": 0.0, "ce_weight": 1.0, "transfer_split": None},
    "ce_vocab": {"answer_weight": 0.0, "kd_weight": 0.0, "ce_weight": 1.0, "ce_over": "vocab", "transfer_split": None},
    "answer_kl": {"answer_weight": 1.0, "kd_weight": 0.0, "ce_weight": 0.0},
    "answer_kl_cosine": {"answer_weight": 1.0, "kd_weight": 0.0, "ce_weight": 0.0, "min_lr_ratio": 0.1},
    "recipe_b32_cosine": {"batch_size": 32, "min_lr_ratio": 0.1},
    "recipe_b32_cosine_lr1e-2": {"batch_size": 32, "min_lr_ratio": 0.1, "learning_rate": 1e-2},
    "answer_kl_T1": {"answer_weight": 1.0, "kd_weight": 0.0, "ce_weight": 0.0, "temperature": 1.0},
    "answer_kl_T4": {"answer_weight": 1.0, "kd_weight": 0.0, "ce_weight": 0.0, "temperature": 4.0},
    "recipe_ce0.25": {"ce_weight": 0.25},
    "recipe_ce1": {"ce_weight": 1.0},
    "recipe_ce_vocab": {"ce_over": "vocab"},
    "recipe_lr1e-3": {"learning_rate": 1e-3},
    "recipe_lr1e-2": {"learning_rate": 1e-2},
    "recipe_cosine": {"min_lr_ratio": 0.1},
    "recipe_lora": {"fine_tune_type": "lora", "lora_rank": 8, "lora_scale": 20.0},
    "recipe_steps2x": {"steps_x": 2},  # twice --steps
    "recipe+tok0.1": {"kd_weight": 0.1, "store": "question"},
    "recipe+tok0.5": {"kd_weight": 0.5, "store": "question"},
    "recipe+tok0.5_T2": {"kd_weight": 0.5, "kd_temperature": 2.0, "store": "question"},
    # the recipe + a transfer set of 1x / 2x / 4x the train split (unlabelled: teacher terms only, CE on train)
    "transfer1x": {"store": "transfer1x", "transfer_split": "transfer"},
    "transfer2x": {"store": "transfer2x", "transfer_split": "transfer"},
    "transfer4x": {"store": "transfer4x", "transfer_split": "transfer"},
    "transfer16x": {"store": "transfer16x", "transfer_split": "transfer"},
}
DEFAULT_ARMS = ("recipe", "transfer0", "ce")  # the demo recipe, without its transfer set, gold labels alone


def parse_arm(spec: str) -> tuple[str, dict]:
    """`NAME:key=value,key=value` (YAML scalars) -> (NAME, overrides)."""
    name, _, body = spec.partition(":")
    over = {}
    for item in filter(None, body.split(",")):
        k, _, v = item.partition("=")
        if k.strip() not in (*DEFAULTS, "store", "steps_x"):
            raise click.BadParameter(f"--arm {spec!r}: {k!r} is not a training setting")
        over[k.strip()] = yaml.safe_load(v)
    return name, over


def test_accuracy(student: Path, adapters: Path | None, data: Path, splits: Path, shots: int) -> float:
    questions, dev = select_questions(str(data), str(splits), "test")
    em = load_eval_model(str(student), str(adapters) if adapters else None, dtype="float32")
    return float(evaluate_model(em, questions, dev, shots=shots, batch_size=16, progress=False).summary["overall"])


def dump(teacher: Path, data: Path, splits: Path, split: str, shots: int, positions: str, student: Path,
         out: Path) -> Path:
    if not (out / "manifest.json").is_file():
        run_command([*python_m(), "kd_mlx.teacher", "dump", "--teacher", str(teacher), "--data", str(data),
                     "--splits", str(splits), "--split", split, "--shots", str(shots), "--top-k", "16",
                     "--positions", positions, "--memory-budget", str(4 * model_bytes(teacher)),  # resident: fast
                     "--student-tokenizer", str(student), "--out", str(out)])
    return out


def val_curve(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [(r["step"], round(r["val_acc"] * 100, 1)) for r in rows if r["kind"] == "val"]


def mean_std(v: list[float]) -> str:
    return f"{statistics.mean(v):6.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:5.2f}"


@click.command()
@click.option("--demo", "demo_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Output of `python -m kd_mlx demo` (its task, splits, store and teacher are reused).")
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--arms", default=",".join(DEFAULT_ARMS), show_default=True, help="Comma-separated names of ARMS.")
@click.option("--arm", "extra_arms", multiple=True, help="Extra arm NAME:key=value,... over the recipe.")
@click.option("--steps", type=int, default=None, help="Optimizer steps per arm (default: the demo's).")
@click.option("--eval-every", type=int, default=25, show_default=True, help="Validation every N steps (curve).")
@click.option("--labels", type=int, default=0, show_default=True,
              help="Scarce labels: keep only N gold-labelled train questions per subject (0: the whole train "
                   "split); transfer sets are then N x factor per subject.")
@click.option("--out", default=None, help="Where runs and kd_effect.json go (default DEMO/kd_effect[_labelsN]).")
def main(demo_dir, seeds, arms, extra_arms, steps, eval_every, labels, out):
    demo = Path(demo_dir).resolve()
    out_dir = Path(out).resolve() if out else demo / ("kd_effect" + (f"_labels{labels}" if labels else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = json.loads((demo / "demo.json").read_text(encoding="utf-8"))
    data, splits, teacher = demo / "task", demo / "splits.json", demo / "models" / "teacher_4bit"
    shots = int(TopKStore(demo / "store").identity.get("shots", 0))
    steps = int(steps or summary["preset"]["student_steps"])
    arm_table = {a: ARMS[a] for a in arms.split(",") if a}
    arm_table.update(dict(parse_arm(s) for s in extra_arms))
    teacher_acc = float(summary["overall"]["teacher"])
    # the demo's own transfer set, if any; --labels tasks carry their own (transferNx stores)
    demo_transfer = None if labels else \
        "transfer" if "transfer" in json.loads(splits.read_text(encoding="utf-8")) else None

    stores: dict[str, tuple[Path, Path, Path]] = {"answer": (demo / "store", data, splits)}  # store, data, splits
    student_dir = demo / "models" / "student"  # its tokenizer: the dumps keep exact class masses for it

    def store_for(kind: str) -> tuple[Path, Path, Path]:
        if labels and kind == "answer":  # the scarce-label task without a transfer set
            kind = "transfer0x"
        if kind not in stores:
            if labels and not kind.startswith("transfer"):
                raise click.BadParameter(f"--labels: store kind {kind!r} is not made for the scarce-label task")
            if kind == "question":  # token-level KD needs the question positions: dumped once
                stores[kind] = (dump(teacher, data, splits, "train,val", shots, "question", student_dir,
                                     out_dir / "store_question"), data, splits)
            elif kind.startswith("transfer"):
                factor = int(kind.removeprefix("transfer").removesuffix("x"))
                t_data, t_splits = write_transfer_task(data, splits, out_dir / kind, factor,
                                                       seed=1000 + int(summary["seed"]), labels=labels)
                stores[kind] = (dump(teacher, t_data, t_splits, "train,val" + (",transfer" if factor else ""),
                                     shots, "answer", student_dir, out_dir / kind / "store"), t_data, t_splits)
            else:
                raise click.BadParameter(f"unknown store kind {kind!r}")
        return stores[kind]

    seed_list = [int(s) for s in seeds.split(",")]
    log = out_dir / "kd_effect.jsonl"  # one line per finished run; a rerun skips runs already there
    done = {}
    if log.is_file():
        for ln in log.read_text(encoding="utf-8").splitlines():
            r = json.loads(ln)
            done[(r["seed"], r["arm"], json.dumps(r["overrides"], sort_keys=True))] = r
    print(f"demo {demo}: teacher test {teacher_acc:.2f}%; {steps} steps; arms {', '.join(arm_table)}", flush=True)
    shape = summary["preset"].get("student_shape", PRESETS["full"]["student_shape"])  # the demo's student
    students = {seed: tiny_phi_dir(out_dir / f"student_seed{seed}", seed=seed, **shape) for seed in seed_list}
    rows: dict[str, list[float]] = {"baseline": [test_accuracy(students[s], None, data, splits, shots)
                                                 for s in seed_list]}
    info: dict[str, dict] = {}
    preps: dict[tuple, object] = {}
    for arm, over in arm_table.items():  # arm by arm, each over all seeds: a partial run gives whole rows
        over = dict(over)
        kind = over.pop("store", "answer")
        arm_steps = steps * int(over.pop("steps_x", 1))
        info[arm] = {**over, "store": kind, "steps": arm_steps}
        for seed in seed_list:
            prev = done.get((seed, arm, json.dumps(info[arm], sort_keys=True)))
            if prev is not None:
                rows.setdefault(arm, []).append(prev["test"])
                print(f"seed {seed} {arm:18s} test {prev['test']:6.2f}%  (from {log.name})", flush=True)
                continue
            store, a_data, a_splits = store_for(kind)
            cfg = {**DEFAULTS, **TRAIN_CONFIG, "transfer_split": demo_transfer,
                   "data": str(a_data), "splits": str(a_splits), "store": str(store),
                   "teacher_tokenizer": str(teacher), "student": str(students[seed]), "steps": arm_steps,
                   "batch_size": summary["preset"]["student_batch"], "eval_every": eval_every,
                   "save_every": arm_steps, "seed": seed, **over, "out": str(out_dir / f"seed{seed}_{arm}")}
            # examples depend on the store, the KD targets and whether the transfer split is in
            key = (seed, kind, bool(cfg["kd_weight"]), cfg["transfer_split"])
            if key not in preps:
                preps[key] = prepare(dict(cfg), progress=False)
            prep = preps[key]
            cfg = {**prep.cfg.to_dict(), **{k: v for k, v in cfg.items() if k != "shots"}}
            if Path(cfg["out"]).exists():  # an unfinished run of this benchmark (finished ones are in the log)
                shutil.rmtree(cfg["out"])
            mx.reset_peak_memory()
            tic = time.perf_counter()
            train_prepared(prep, cfg, progress=False)
            dt = time.perf_counter() - tic
            acc = test_accuracy(students[seed], Path(cfg["out"]) / "last", data, splits, shots)
            rows.setdefault(arm, []).append(acc)
            rec = {"seed": seed, "arm": arm, "test": acc, "seconds": dt, "n_train": len(prep.train),
                   "val_curve": val_curve(Path(cfg["out"])), "peak_mlx_mib": mx.get_peak_memory() / 2**20,
                   "overrides": info[arm], "student_shape": shape}
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"seed {seed} {arm:18s} test {acc:6.2f}%  val {rec['val_curve']}  ({dt:.0f} s, "
                  f"{len(prep.train)} train q, peak MLX {rec['peak_mlx_mib']:.0f} MiB)", flush=True)
    base = statistics.mean(rows["baseline"])
    print(f"\nheld-out test accuracy (%), mean ± std over seeds {seed_list}; teacher {teacher_acc:.2f}; chance 25; "
          f"gap closed = (arm - baseline) / (teacher - baseline)")
    for arm, v in rows.items():
        gap = (statistics.mean(v) - base) / (teacher_acc - base)
        print(f"  {arm:18s} {mean_std(v)}   gap closed {gap:5.0%}   per seed {', '.join(f'{x:.1f}' for x in v)}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(f"process peak RSS {rss / 2**30:.2f} GiB")
    result = {"command": " ".join(sys.argv), "machine": f"{platform.system()} {platform.machine()}",
              "teacher_test": teacher_acc, "labels_per_subject": labels or None, "seeds": seed_list,
              "steps": steps, "recipe": TRAIN_CONFIG,
              "student_shape": shape,
              "arms": info, "accuracy": rows, "peak_rss_bytes": rss}
    (out_dir / "kd_effect.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out_dir / 'kd_effect.json'}")


if __name__ == "__main__":
    main()
