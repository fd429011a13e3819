"""The real-model study's plan, fixed before anything runs: its sizes (:data:`PRESETS`), the comparisons it reports and
the names of its reference rows. Read by the runner (:mod:`eakd_llm.studies.real_study`) and the report
(:mod:`eakd_llm.studies.real_study_report`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.eakd_config import ConfigError

STUDY_SYSTEM = "You are a helpful assistant. Answer in one to three short sentences."
TEACHER_CACHE_CHOICES: tuple[str, ...] = ("auto", "on", "off")
# (A, B): A - B on every metric, paired by training seed and prompt (pairs whose recipes are both present)
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("eakd_token", "kd"), ("eakd_token", "kd_scaled"), ("eakd_token_normalized", "kd"),
    ("eakd_token_normalized_t1", "kd"), ("eakd_token_normalized_t05", "kd"),
    # the tau' axis: normalised EA at tau' = 1 and 0.5 against the paper's tau' = 2
    ("eakd_token_normalized_t1", "eakd_token_normalized"), ("eakd_token_normalized_t05", "eakd_token_normalized"),
    ("kd", "sft"), ("eakd_token", "sft"))
# Control rows a study derives from its recipes: name -> (the recipe it trains, the EA recipe whose measured effective
# scale sum(w d) / sum(d) in the same seed's run becomes its kd_scale): KD with EA's scale but not its adaptivity.
SCALED_CONTROLS: dict[str, tuple[str, str]] = {"kd_scaled": ("kd", "eakd_token")}
TEACHER, PRUNED = "teacher", "pruned, untrained"
# test set -> (folder of the teacher's answers, the teacher's reference scores, each student's answers file)
TEST_SETS: dict[str, tuple[str, str, str]] = {
    "test": ("data", "reference.json", "answers.jsonl"),
    "mt_bench": ("data-mtbench", "reference-mtbench.json", "answers-mtbench.jsonl"),
}
TEST_SET_NAMES = {"test": "the prompt set's unseen test prompts", "mt_bench": "MT-Bench's first-turn questions"}
METRIC_NAMES = {"ce": "CE on the teacher's answers (nats/token, lower is better)",
                "kl": "KL(T‖S) over the vocabulary (nats/token, lower is better)", "top1": "top-1 agreement (%)",
                "rougeL": "ROUGE-L vs the teacher's answers"}


@dataclass(frozen=True)
class StudyPlan:
    """Sizes of one study, fixed before it starts; :data:`PRESETS` holds the named ones. ``None`` counts: the
    whole split of the prompt set."""

    num_train: int | None = None
    num_test: int | None = None
    num_validation: int = 0  # held-out answers for the learning curve (``--learning-curve``); 0: none
    steps: int = 500
    batch_size: int = 8
    num_layers: int = 24
    max_length: int = 256
    max_prompt_length: int = 128
    max_new_tokens: int = 96
    calibration_samples: int = 128
    generation_batch_size: int = 16
    eval_batch_size: int = 8
    teacher_cache: str = "auto"
    cache_top_k: int = 64
    system: str | None = STUDY_SYSTEM
    keep_truncated: bool = False
    mt_bench: bool = False  # also score fidelity on MT-Bench's 80 first-turn questions (prompts written by others)

    def test_sets(self) -> list[str]:
        """The test sets every model is scored on: the prompt set's test split, and MT-Bench when asked for."""
        return ["test", *(["mt_bench"] if self.mt_bench else [])]

    def validate(self) -> None:
        for name in ("steps", "batch_size", "num_layers", "max_new_tokens", "calibration_samples",
                     "generation_batch_size", "eval_batch_size", "cache_top_k", "num_train"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.num_validation < 0:
            raise ConfigError(f"--num-validation must be >= 0, got {self.num_validation}")
        if self.num_test is not None and self.num_test < 2:
            raise ConfigError(f"--num-test must be >= 2 (paired intervals need two prompts), got {self.num_test}")
        if self.teacher_cache not in TEACHER_CACHE_CHOICES:
            raise ConfigError(f"--teacher-cache {self.teacher_cache!r} is not allowed; choose one of: "
                              f"{', '.join(TEACHER_CACHE_CHOICES)}")
        if self.max_prompt_length + self.max_new_tokens > self.max_length:
            raise ConfigError(f"--max-length {self.max_length} cannot hold a prompt of max_prompt_length "
                              f"{self.max_prompt_length} and an answer of --max-new-tokens {self.max_new_tokens}: "
                              "training would cut the teacher's answers")


PRESETS: dict[str, StudyPlan] = {
    "default": StudyPlan(),
    # ~45 min on 2 CPU cores: two single-threaded workers, about 6 s per 24-layer student step at 4 x ~110 tokens.
    "pilot": StudyPlan(num_train=320, num_test=64, steps=150, batch_size=4, max_length=192, max_prompt_length=96,
                       max_new_tokens=64, calibration_samples=64),
    # a few minutes: every step of the study once, at toy sizes (16-token answers: truncated ones are kept)
    "smoke": StudyPlan(num_train=12, num_test=6, steps=2, batch_size=2, max_length=128, max_prompt_length=96,
                       max_new_tokens=16, calibration_samples=8, generation_batch_size=8, teacher_cache="off",
                       keep_truncated=True),
}
