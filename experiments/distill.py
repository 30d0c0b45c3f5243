"""distill: R1's distillation into dense students, against RL on the students themselves.

    python -m experiments distill --run-dir runs/distill --set r1_run=runs/r1

The teacher is an r1 checkpoint (`teacher`: stage 2 seed 0 by default, the measured run's
strongest reasoner; R1 distilled its final model, `--set teacher=stage4_seed0`); the r1 run is
reused, or run in run_dir/r1. Two dense students, a tiny Qwen2-style (q/k/v biases, tied head)
and a tiny Llama-style (Llama 3 rope scaling, one KV head) model, are pre-trained on the r1
base's corpus with its tokenizer (so logits compare id by id). Per student:

    base        the pre-trained student (R1-Zero's template: it has never seen the chat)
    seq-SFT     SFT on the teacher's rejection-sampled traces (correct, R1's filters) plus
                non-reasoning conversations: sequence-level distillation, what R1-Distill did
    logit KD    the same data with the teacher's logits (train/kd.py: forward KL, weight 0.5)
    on-policy   from seq-SFT, the student samples and minimises its reverse KL to the teacher
                on its own samples (rl/on_policy_distill.py)
    GRPO        R1-Zero-style GRPO on the student base with the rule rewards (R1's comparison:
                RL on the small model itself), steps set for compute like on-policy's

The table (run_dir/table.md) gives held-out accuracy per reasoning task and language, format
rate, mean response length, minutes, and compute: student and teacher FLOPs of each row's own
stage (the teacher's sampling of the shared traces on its own line). FLOPs are 6N per trained
token and 2N per token only run forward or sampled (train/flops.py's convention), counted from
each run's logged tokens; rejection sampling counts every drawn sample at max_new_tokens (an
upper bound).

R1's claim: distilling a strong teacher beats running RL on the small model (their
Qwen-32B: distilled 72.6 AIME pass@1 against 47.0 with 10K RL steps). The table says whether
it held here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from experiments import r1 as r1_pipeline
from experiments import stages
from model import presets
from rl import world, world_rewards
from rl.grpo import GRPOConfig, constant_lr
from rl.on_policy_distill import OnPolicyConfig, distill_on_policy
from rl.rejection_sampling import RejectionConfig
from rl.world_eval import summarize
from train.data import TOKENIZER_FILE
from train.flops import flops_per_token
from train.kd import KDConfig
from train.loop import check_finished
from train.metrics import read_metrics
from train.run import load_run
from train.run_dir import to_json
from train.sft import SFTConfig
from train.splits import Split

COLUMNS = (
    ("arithmetic_en", "arith en"), ("arithmetic_zh", "arith zh"), ("countdown_en", "cd en"),
    ("countdown_zh", "cd zh"), ("code_en", "code"), ("format", "format"),
    ("len_reasoning", "len"), ("student_pflops", "student PFLOP"),
    ("teacher_pflops", "teacher PFLOP"), ("minutes", "min"),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    r1: r1_pipeline.R1Config = dataclasses.field(default_factory=r1_pipeline.R1Config)
    r1_run: str | None = None  # the r1 experiment's run dir; None: run_dir/r1
    # The r1 stage whose checkpoint teaches: stage 2's, the strongest reasoner of the measured
    # r1 run (R1 distilled its final model; ours lost English arithmetic in stage 3).
    teacher: str = "stage2_seed0"
    students: tuple[str, ...] = ("qwen-tiny", "llama-tiny")  # model.presets names
    reasoning_prompts: int = 1000
    rejection: RejectionConfig = dataclasses.field(
        default_factory=lambda: r1_pipeline.R1Config().rejection
    )
    general_conversations: int = 300
    sft: SFTConfig = dataclasses.field(default_factory=lambda: r1_pipeline.default_sft(3.0))
    kd_weight: float = 0.5  # logit KD: of the divergence (KDConfig.weight)
    kd_beta: float = 0.0  # 0 forward KL (KDConfig.beta)
    kd_top_k: int | None = None
    on_policy: OnPolicyConfig = dataclasses.field(
        default_factory=lambda: OnPolicyConfig(
            optimizer=constant_lr(5e-5),
            steps=30,
            prompts_per_step=8,
            samples_per_prompt=4,
            max_new_tokens=192,
            eval_every=15,
            checkpoint_every=15,
        )
    )
    grpo: GRPOConfig = dataclasses.field(
        default_factory=lambda: r1_pipeline.default_grpo(lr=2e-4, temperature=1.0)
    )

    def __post_init__(self):
        for name in self.students:
            if presets.get(name).gqa is None:
                raise ValueError(f"DistillConfig.students: {name!r} is not a dense GQA preset")


def get_config() -> DistillConfig:
    return DistillConfig()


def _tokens(run_dir: Path) -> float:
    return float(sum(r.get("tokens", 0.0) for r in read_metrics(run_dir) if "loss" in r))


def _grpo_tokens(run_dir: Path, config: GRPOConfig, prompt_len: float) -> float:
    rows = config.prompts_per_step * config.group_size
    lengths = [r["completion_len_mean"] for r in read_metrics(run_dir) if "reward_mean" in r]
    return float(sum(rows * (prompt_len + n) for n in lengths))


def _student_base(config: DistillConfig, name: str, r1_base: Path, run_dir: Path) -> Path:
    """The student pre-trained on the r1 base's corpus with its tokenizer (copied first, so
    pretrain_base neither regenerates the corpus nor trains another tokenizer)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for file in ("corpus.jsonl", TOKENIZER_FILE):
        if not (run_dir / file).exists():
            shutil.copy(r1_base / file, run_dir / file)
    base = dataclasses.replace(config.r1.base, base=dataclasses.replace(config.r1.base.base,
                               model=name))  # fmt: skip
    return stages.base_stage(base, config.r1.parallel, run_dir)


def run(config: DistillConfig, run_dir) -> dict:
    run_dir = Path(run_dir)
    r1_dir = Path(config.r1_run) if config.r1_run else run_dir / "r1"
    r1_pipeline.run(config.r1, r1_dir)  # reuses every finished stage
    timed = stages.Timings(run_dir / "timings.json")
    c1, w, parallel = config.r1, config.r1.world, config.r1.parallel
    r1_base = Path(c1.base_run) if c1.base_run else r1_dir / "base"
    tok = load_run(r1_base).tokenizer
    teacher_dir = r1_dir / config.teacher
    teacher = stages.policy(teacher_dir, tok)
    t_fwd = flops_per_token(teacher.cfg, w.eval_max_new_tokens) / 3  # per token, forward

    def reasoning(split, count, seed):
        return world.reasoning_tasks(split, count, seed, mix=w.mix,
                                     chinese_fraction=w.chinese_fraction)  # fmt: skip

    heldout = reasoning(Split.HELDOUT, w.eval_reasoning, 0)
    chat_eval, zero_eval = world.as_chat(heldout, tok), world.as_r1_zero(heldout)
    records, compute = {}, {}

    def evaluate(name, run_, where, tasks_):
        records[name] = stages.evaluate_stage(
            run_, where, tasks_, {}, max_new_tokens=w.eval_max_new_tokens
        )

    evaluate(f"teacher (r1 {config.teacher})", teacher, teacher_dir, chat_eval)
    with timed("teacher samples"):
        prompts = world.as_chat(reasoning(Split.TRAIN, config.reasoning_prompts, 9000), tok)
        kept, rs_stats = stages.sample_stage(
            config.rejection, teacher, teacher_dir, prompts, run_dir / "samples"
        )
        data = kept + stages.general_conversations(config.general_conversations, 9)
    drawn = rs_stats.get("drawn", len(prompts) * config.rejection.samples_per_prompt)
    compute["teacher samples"] = (0.0, t_fwd * drawn * config.rejection.max_new_tokens)
    train_tasks = reasoning(Split.TRAIN, w.train_tasks, 1000)
    grpo_eval = reasoning(Split.HELDOUT, w.grpo_eval, 1)

    for name in config.students:
        where = run_dir / name
        with timed(f"{name} base"):
            base_dir = _student_base(config, name, r1_base, where / "base")
            base = load_run(base_dir)
            evaluate(f"{name} base", base, base_dir, zero_eval)
        s_train = flops_per_token(base.cfg, config.sft.data.seq_len)
        compute[f"{name} base"] = (s_train * _tokens(base_dir), 0.0)

        with timed(f"{name} seq-SFT"):
            stages.sft_stage(config.sft, base_dir, data, parallel, where / "seq_sft")
            seq = load_run(where / "seq_sft")
            evaluate(f"{name} seq-SFT", seq, where / "seq_sft", chat_eval)
        compute[f"{name} seq-SFT"] = (s_train * _tokens(where / "seq_sft"), 0.0)

        with timed(f"{name} logit KD"):
            kd_loss = KDConfig(teacher_run=str(teacher_dir), weight=config.kd_weight,
                               beta=config.kd_beta, top_k=config.kd_top_k)  # fmt: skip
            kd_sft = dataclasses.replace(config.sft, kd=kd_loss)
            _kd_teacher_dir(teacher_dir, tok)
            stages.sft_stage(kd_sft, base_dir, data, parallel, where / "logit_kd")
            kd = load_run(where / "logit_kd")
            evaluate(f"{name} logit KD", kd, where / "logit_kd", chat_eval)
        kd_tokens = _tokens(where / "logit_kd")
        compute[f"{name} logit KD"] = (s_train * kd_tokens, t_fwd * kd_tokens)

        with timed(f"{name} on-policy"):
            result = distill_on_policy(
                where / "on_policy", student_cfg=seq.cfg, student=seq.variables,
                teacher_cfg=teacher.cfg, teacher=teacher.variables, tokenizer=tok,
                train_tasks=world.as_chat(train_tasks, tok),
                eval_tasks=world.as_chat(grpo_eval, tok), eval_fns=world_rewards.RULES,
                config=dataclasses.replace(config.on_policy, parallel=parallel),
                meta={"distill": to_json(config)},
            )  # fmt: skip
            check_finished(result.interrupted, where / "on_policy")
            on = stages.policy(where / "on_policy", tok)
            evaluate(f"{name} on-policy", on, where / "on_policy", chat_eval)
        tokens = _tokens(where / "on_policy")
        # Sampled (forward), then trained (6N); the teacher scores every row once.
        compute[f"{name} on-policy"] = ((s_train + s_train / 3) * tokens, t_fwd * tokens)

        with timed(f"{name} GRPO"):
            stages.grpo_stage(
                config.grpo, base, world.as_r1_zero(train_tasks),
                world_rewards.weighted(world_rewards.RULES, c1.r1_zero_rewards),
                world.as_r1_zero(grpo_eval), seed=c1.seeds[0], parallel=parallel,
                run_dir=where / "grpo", meta={"distill": to_json(config)},
            )  # fmt: skip
            evaluate(f"{name} GRPO", stages.policy(where / "grpo", tok), where / "grpo", zero_eval)
        prompt_len = sum(len(tok.encode(t["prompt"])) for t in zero_eval) / len(zero_eval)
        tokens = _grpo_tokens(where / "grpo", config.grpo, prompt_len)
        compute[f"{name} GRPO"] = ((s_train + s_train / 3) * tokens, 0.0)

    rows = {}
    for name, recs in records.items():
        student, teacher_f = compute.get(name, (None, None))
        rows[name] = summarize(recs) | {
            "minutes": timed.minutes.get(name),
            "student_pflops": None if student is None else student / 1e15,
            "teacher_pflops": None if teacher_f is None else teacher_f / 1e15,
        }
    rows["(teacher sampling of the traces)"] = {
        "teacher_pflops": compute["teacher samples"][1] / 1e15,
        "minutes": timed.minutes.get("teacher samples"),
    }
    text = "Held-out reasoning (greedy), compute per row's own stage:\n\n"
    text += stages.table(rows, COLUMNS)
    print(text)
    (run_dir / "table.md").write_text(text + "\n", encoding="utf-8")
    summary = {"minutes": timed.minutes, "rows": rows, "rejection_sampling": rs_stats}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {
        "minutes": round(sum(timed.minutes.values()), 2),
        **{f"{n} {k}": v for n, row in rows.items() for k, v in row.items()
           if k in ("arithmetic_en", "arithmetic_zh")},
    }  # fmt: skip


def _kd_teacher_dir(teacher_dir: Path, tokenizer) -> None:
    """A GRPO run dir keeps no tokenizer; logit KD loads the teacher as a run, so it gets the
    base's (the one it was trained with)."""
    if not (teacher_dir / TOKENIZER_FILE).exists():
        tokenizer.save(teacher_dir / TOKENIZER_FILE)
