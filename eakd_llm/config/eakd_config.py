"""`EAKDConfig`: the Trainer arguments plus everything a distillation run needs, validated up front."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..loss.distillation import DIVERGENCES, EA_FORMULAS, EA_NORMALIZATIONS, GRANULARITIES

DATASET_FORMATS = ("auto", "prompt_response", "messages", "instruction")
DTYPES = ("auto", "float32", "bfloat16", "float16")
NONFINITE_POLICIES = ("error", "skip")


class ConfigError(ValueError):
    """A recipe, command line or dataset problem, reported before any training starts."""


FLASH_REFUSAL = (
    "packing with flash attention is not supported: transformers treats a batch as packed for flash attention only "
    "when it has ONE row (modeling_flash_attention_utils._is_packed_sequence), and a packed micro-batch has several, "
    "so documents sharing a row would attend to each other. Use attn_implementation: sdpa or eager (they build the "
    "block-diagonal mask from position_ids for any number of rows), or packing: false"
)


def uses_flash_attention(attn_implementation: str | None) -> bool:
    """Flash-attention kernels (``flash_attention_2/3``, hub kernels such as ``kernels-community/flash-attn``)."""
    return bool(attn_implementation) and "flash" in attn_implementation



# the fields naming a model folder or hub id, resolved to absolute paths when they exist here
MODEL_PATH_FIELDS = ("model_name_or_path", "teacher_model_name_or_path", "tokenizer_name_or_path", "student_init_from")


def looks_like_local_path(path: str) -> bool:
    """Hub ids are "name" or "org/name": anything else path-like is meant as a local path."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1


@dataclass
class EAKDConfig(TrainingArguments):
    """Arguments of an EA-KD distillation run (every `TrainingArguments` field is accepted too).

    The loss is ``(1 - kd_ratio) * CE(student, ground truth) + kd_ratio * KD``, where KD is
    :func:`eakd_llm.loss.distillation.distillation_loss` (EA-weighted when ``ea`` is true). ``kd_ratio: 0`` is plain
    supervised fine-tuning and loads no teacher.
    """

    # ----- models -----
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Student model: a local folder or a hub id (loaded with from_pretrained)."}
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher model: a local folder or a hub id. Required when kd_ratio > 0; unused otherwise."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use; defaults to the student's (model_name_or_path)."}
    )
    model_dtype: str = field(
        default="auto",
        metadata={"help": "Student weights dtype: auto (as saved), float32, bfloat16 or float16.", "choices": DTYPES},
    )
    teacher_dtype: str | None = field(
        default=None,
        metadata={"help": "Teacher weights dtype (auto, float32, bfloat16, float16); defaults to model_dtype."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel passed to from_pretrained (e.g. sdpa, eager)."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow model/tokenizer code from the model folder or hub repo to run. Off unless needed."},
    )
    # ----- distillation -----
    kd_ratio: float = field(
        default=0.5,
        metadata={"help": "Weight of the KD term: loss = (1 - kd_ratio) * CE + kd_ratio * KD, in [0, 1]. "
                  "0 = plain SFT (no teacher). Keep it below 1 with EA: EA alone starves confident tokens (EOS)."},
    )
    divergence: str = field(
        default="fkl",
        metadata={"help": "Divergence of the KD term: fkl, rkl, skl, srkl, jsd or tvd.", "choices": DIVERGENCES},
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature tau of the divergence (> 0); the KD term is scaled by tau^2."},
    )
    ea: bool = field(default=True, metadata={"help": "Weight the KD loss by EA-KD entropy weights (false: plain KD)."})
    ea_granularity: str = field(
        default="token",
        metadata={"help": "EA weight per token, or per sequence (entropies averaged over its response tokens).",
                  "choices": GRANULARITIES},
    )
    entropy_temperature: float = field(
        default=2.0,
        metadata={"help": "Temperature tau' of the entropies behind the EA weights (> 0), separate from tau. "
                  "2.0 is the paper's value for transformer teachers."},
    )
    ea_formula: str = field(
        default="full",
        metadata={"help": "EA weight formula: full = (H_T + H_T*H_S/log V) / 2 (the paper), teacher = H_T alone, "
                  "interaction = H_T*H_S/log V alone (the paper's weight ablation).", "choices": EA_FORMULAS},
    )
    ea_normalize: str = field(
        default="none",
        metadata={"help": "none (the paper's weights), or mean: divide the EA weights by their mean over the "
                  "micro-batch's response tokens (sequence level: token-weighted), so EA reweights tokens without "
                  "scaling the KD term. Use it to compare EA with plain KD at the same KD scale and learning rate.",
                  "choices": EA_NORMALIZATIONS},
    )
    kd_scale: float = field(
        default=1.0,
        metadata={"help": "Constant multiplier of the KD term (> 0): loss = (1 - kd_ratio) * CE + kd_ratio * "
                  "kd_scale * KD. A control: plain KD with kd_scale = EA's measured effective scale "
                  "(ea_effective_scale = sum w*d / sum d, logged by EA runs) has EA's scale without its adaptivity. "
                  "Leave at 1 otherwise."},
    )
    skew_alpha: float = field(
        default=0.1, metadata={"help": "Skew alpha of the skl/srkl divergences, in (0, 1) (DistiLLM uses 0.1)."}
    )
    jsd_beta: float = field(default=0.5, metadata={"help": "Mixture weight beta of the jsd divergence, in (0, 1)."})
    fused_loss: bool = field(
        default=True,
        metadata={"help": "Compute CE and KD chunk by chunk from the final hidden states, never holding "
                  "full-vocabulary logits (same loss and gradients). Falls back to full logits where unsupported "
                  "(trainable FSDP2-sharded student head, FSDP2 CPU offload, FSDP1, LoRA on lm_head); the first step "
                  "logs the path."},
    )
    loss_chunk_size: int = field(
        default=1024, metadata={"help": "Response tokens per chunk of the fused loss (>= 1); memory ~ chunk x V."}
    )
    compile_loss: bool | str = field(
        default="auto",
        metadata={"help": "torch.compile the fused loss's per-chunk maths (fewer, fused kernels over each [chunk, V] "
                  "block; the first step pays the compilation): true, false, or auto (on for CUDA, off for CPU). If "
                  "compilation fails, the run says so once and continues with the eager maths. Needs fused_loss."},
    )
    nonfinite_logits: str = field(
        default="error",
        metadata={"help": "What to do when teacher or student logits contain NaN/inf: error (stop, naming the step) "
                  "or skip (zero that batch's loss and log a warning).", "choices": NONFINITE_POLICIES},
    )
    # ----- on-policy distillation -----
    on_policy_fraction: float = field(
        default=0.0,
        metadata={"help": "GKD's lambda, in [0, 1]: the probability that an optimizer step trains on responses the "
                  "student generates for the batch's prompts (decided per step from the seed, the same for every "
                  "micro-batch and process). 0: dataset responses only; 1: always on-policy. No CE on "
                  "student-generated tokens."},
    )
    seq_kd: bool = field(
        default=False,
        metadata={"help": "Sequence-level KD: steps that are not on-policy train on responses the teacher generates "
                  "(CE kept on them), instead of the dataset's."},
    )
    on_policy_warmup_steps: int = field(
        default=0,
        metadata={"help": "The first N optimizer steps (>= 0) are never on-policy (lambda = 0: dataset responses, or "
                  "the teacher's with seq_kd) before on_policy_fraction applies, so that the student's samples are "
                  "worth scoring. No effect when on_policy_fraction is 0."},
    )
    on_policy_fraction_warmup_steps: int = field(
        default=0,
        metadata={"help": "After on_policy_warmup_steps, lambda rises linearly over this many steps R (>= 0), "
                  "lambda * k / (R + 1) at the k-th, then stays at on_policy_fraction (a DistiLLM-style ramp). "
                  "0: lambda applies in full right after the warmup."},
    )
    student_init_from: str | None = field(
        default=None,
        metadata={"help": "A local checkpoint folder whose weights initialise the student instead of "
                  "model_name_or_path's, e.g. the output_dir (or a checkpoint-N inside it) of an off-policy run, to "
                  "start on-policy training from a trained student; it must exist when the recipe is read. It must "
                  "hold the student's architecture (config.json + weights), or with use_peft a LoRA adapter "
                  "(adapter_config.json) for model_name_or_path, which keeps training. The tokenizer still comes from "
                  "model_name_or_path / tokenizer_name_or_path."},
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Most tokens generated per response in on-policy / seq_kd steps (>= 1); default "
                  "max_length - max_prompt_length. Prompt + response never exceed max_length."},
    )
    generation_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of on-policy / seq_kd generation (> 0)."}
    )
    generation_top_p: float = field(
        default=1.0, metadata={"help": "Nucleus (top-p) filtering of on-policy / seq_kd generation, in (0, 1]."}
    )
    generation_top_k: int = field(
        default=0, metadata={"help": "Top-k filtering of on-policy / seq_kd generation (>= 0; 0 = off)."}
    )
    # ----- teacher cache -----
    teacher_cache: str | None = field(
        default=None,
        metadata={"help": "Folder written by `eakd-llm cache-teacher`: train from the teacher's cached top-k "
                  "log-probabilities and exact entropies instead of loading the teacher. The cache must match this "
                  "run's teacher, tokenizer, data, lengths, temperature and entropy_temperature."},
    )
    # ----- served teacher -----
    teacher_server: str | None = field(
        default=None,
        metadata={"help": "URL of a teacher served by an inference engine (`eakd-llm serve-teacher`, vLLM's pooling "
                  "runner): each batch's teacher hidden states are asked for ahead of its step and projected through "
                  "the teacher's head, loaded alone from teacher_model_name_or_path (which the server must serve: "
                  "checked at start). Exact: the full-vocabulary distribution, EA's exact entropies."},
    )
    teacher_server_dtype: str = field(
        default="float32",
        metadata={"help": "How the served hidden states travel: float32 (exact), bfloat16 or float16 (half the "
                  "bytes; lossless for a teacher served in that dtype)."},
    )
    teacher_server_timeout: float = field(
        default=300.0, metadata={"help": "Seconds one teacher-server request may take before it is retried (> 0)."}
    )
    teacher_server_retries: int = field(
        default=5,
        metadata={"help": "Tries of a failed teacher-server request (dropped connection, server error), with "
                  "exponential backoff from 1 s; then the run stops with the error (>= 1)."},
    )
    # ----- data -----
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Training data: a hub dataset id, a local .json/.jsonl/.parquet file, or a folder of them "
                  "(split files named <split>.jsonl etc.)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_eval_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on (needs eval_strategy other than 'no')."}
    )
    dataset_format: str = field(
        default="auto",
        metadata={"help": "Record format: prompt_response (prompt/response columns), messages (chat, rendered with "
                  "the tokenizer's chat template), instruction (instruction/input/response, MiniLLM prompt "
                  "template), or auto (messages if that column exists, else instruction, else prompt_response).",
                  "choices": DATASET_FORMATS},
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Prompt column (prompt_response format)."})
    response_column: str = field(
        default="response", metadata={"help": "Response column (prompt_response and instruction formats)."}
    )
    messages_column: str = field(default="messages", metadata={"help": "Chat messages column (messages format)."})
    instruction_column: str = field(
        default="instruction", metadata={"help": "Instruction column (instruction format)."}
    )
    context_column: str = field(
        default="input", metadata={"help": "Optional context/input column of the instruction format (Dolly: context)."}
    )
    max_length: int = field(default=512, metadata={"help": "Maximum tokens of prompt + response (>= 2)."})
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Maximum prompt tokens, in [1, max_length); longer prompts keep their end. "
                  "Default: max_length // 2 (256 of 512, as MiniLLM/DistiLLM)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training records."})
    exclude_eval_prompts: list[str] | None = field(
        default=None,
        metadata={"help": "Evaluation files (.jsonl/.json, raw instruction/input or processed prompt records, e.g. "
                  "MiniLLM's data/dolly/valid.jsonl): training records whose normalised prompt (instruction + "
                  "context) appears in them are dropped, and the count is logged. Keeps a benchmark's test prompts "
                  "out of training."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack each micro-batch's examples into as few rows of at most max_length tokens as fit, "
                  "with per-document position_ids (no attention across documents; sequence-level EA per document). "
                  "Same loss as the padded batch, less padding. The first step checks that the models keep packed "
                  "documents apart and refuses to train otherwise."},
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation records."})
    # ----- LoRA -----
    use_peft: bool = field(
        default=False, metadata={"help": "Train a LoRA adapter on the student instead of all weights."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (>= 1)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scaling = lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout, in [0, 1)."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt (e.g. [q_proj, v_proj]); default: all linear layers."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "Resume from this checkpoint folder, or 'last' for the newest checkpoint-N in output_dir "
                  "(optimizer, scheduler, RNG and data position are restored)."},
    )
    # ----- Trainer defaults changed for distillation -----
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept false: the collator needs the tokenized columns as they are."}
    )
    report_to: str | list[str] | None = field(
        default="none", metadata={"help": "Integrations to report to (none, tensorboard, wandb, ...)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log losses, entropies and EA weights every N steps."})
    prediction_loss_only: bool = field(
        default=True,
        metadata={"help": "Evaluation keeps only losses, not full-vocabulary logits (which would fill memory)."},
    )

    def __post_init__(self) -> None:
        self.resolve_local_paths()
        self.validate()
        super().__post_init__()

    def resolve_local_paths(self) -> None:
        """Model folders that exist here become absolute paths (hub ids stay ids), so what a run records (a LoRA
        adapter's ``base_model_name_or_path``, a cache's teacher) still names them from another working directory."""
        for name in MODEL_PATH_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str) and value and os.path.exists(os.path.expanduser(value)):
                setattr(self, name, os.path.abspath(os.path.expanduser(value)))

    def validate(self) -> None:
        """Check every distillation field; raise :class:`ConfigError` naming the field and the allowed values."""
        _choice("divergence", self.divergence, DIVERGENCES)
        _choice("ea_granularity", self.ea_granularity, GRANULARITIES)
        _choice("ea_formula", self.ea_formula, EA_FORMULAS)
        _choice("ea_normalize", self.ea_normalize, EA_NORMALIZATIONS)
        _choice("dataset_format", self.dataset_format, DATASET_FORMATS)
        _choice("model_dtype", self.model_dtype, DTYPES)
        if self.teacher_dtype is not None:
            _choice("teacher_dtype", self.teacher_dtype, DTYPES)
        _choice("nonfinite_logits", self.nonfinite_logits, NONFINITE_POLICIES)
        _positive("temperature", self.temperature)
        _positive("entropy_temperature", self.entropy_temperature)
        _positive("kd_scale", self.kd_scale)
        _in_range("kd_ratio", self.kd_ratio, 0.0, 1.0, closed=True)
        _in_range("skew_alpha", self.skew_alpha, 0.0, 1.0, closed=False)
        _in_range("jsd_beta", self.jsd_beta, 0.0, 1.0, closed=False)
        if isinstance(self.compile_loss, str):
            if self.compile_loss.lower() in ("true", "false"):
                self.compile_loss = self.compile_loss.lower() == "true"
            elif self.compile_loss != "auto":
                raise ConfigError(
                    f"compile_loss={self.compile_loss!r} is not allowed; choose one of: true, false, auto"
                )
        if self.compile_loss is True and not self.fused_loss:
            raise ConfigError("compile_loss: true needs fused_loss: true (it compiles the fused loss's chunk maths)")
        _in_range("on_policy_fraction", self.on_policy_fraction, 0.0, 1.0, closed=True)
        for name in ("on_policy_warmup_steps", "on_policy_fraction_warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (optimizer steps), got {getattr(self, name)}")
        if self.student_init_from is not None:
            check_student_init_folder(self.student_init_from, self.use_peft)
            _check_outside_output_dir(self.student_init_from, self.output_dir)
        _positive("generation_temperature", self.generation_temperature)
        _in_range("generation_top_p", self.generation_top_p, 0.0, 1.0, closed=True, low_closed=False)
        if self.generation_top_k < 0:
            raise ConfigError(
                f"generation_top_k must be >= 0 (0 turns top-k filtering off), got {self.generation_top_k}"
            )
        if self.packing and uses_flash_attention(self.attn_implementation):
            raise ConfigError(f"{FLASH_REFUSAL} (attn_implementation={self.attn_implementation})")
        if (self.on_policy_fraction > 0 or self.seq_kd) and self.kd_ratio == 0:
            raise ConfigError("on_policy_fraction > 0 and seq_kd need a teacher to score the generated responses: set "
                              "kd_ratio > 0")
        if self.teacher_cache and (self.on_policy_fraction > 0 or self.seq_kd):
            raise ConfigError(
                "teacher_cache holds the teacher's outputs for the dataset's responses only: it cannot score generated "
                "ones; set on_policy_fraction: 0 and seq_kd: false, or drop teacher_cache"
            )
        if self.teacher_server:
            self._validate_teacher_server()
        if self.loss_chunk_size < 1:
            raise ConfigError(f"loss_chunk_size must be >= 1, got {self.loss_chunk_size}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {self.max_length}")
        if self.max_prompt_length is None:
            self.max_prompt_length = self.max_length // 2
        if not 1 <= self.max_prompt_length < self.max_length:
            raise ConfigError(
                f"max_prompt_length must be in [1, max_length), got {self.max_prompt_length} with max_length "
                f"{self.max_length}: a prompt that fills max_length leaves no room for the response"
            )
        if self.max_new_tokens is not None and not 1 <= self.max_new_tokens <= self.max_length - 1:
            raise ConfigError(f"max_new_tokens must be in [1, max_length - 1] = [1, {self.max_length - 1}], got "
                              f"{self.max_new_tokens}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or null, got {value}")
        if self.use_peft:
            if self.lora_r < 1:
                raise ConfigError(f"lora_r must be >= 1, got {self.lora_r}")
            _in_range("lora_dropout", self.lora_dropout, 0.0, 1.0, closed=False, low_closed=True)

    def _validate_teacher_server(self) -> None:
        if not self.teacher_server.startswith(("http://", "https://")):
            raise ConfigError(f"teacher_server must be an http:// or https:// URL, got {self.teacher_server!r}")
        if self.teacher_cache:
            raise ConfigError("teacher_server and teacher_cache are two teacher sources: set one of them")
        if not self.teacher_model_name_or_path:
            raise ConfigError("teacher_server needs teacher_model_name_or_path: the served teacher's folder, whose "
                              "tokenizer is checked against the server and whose head projects its hidden states")
        if self.seq_kd:
            raise ConfigError("seq_kd generates with the teacher model, which a served teacher does not load: set "
                              "seq_kd: false (on-policy batches are scored through the server)")
        if self.packing:
            raise ConfigError("packing is not supported with teacher_server (the server would attend across the "
                              "packed documents): set packing: false")
        _choice("teacher_server_dtype", self.teacher_server_dtype, ("float32", "bfloat16", "float16"))
        if self.dataloader_num_workers > 0:
            raise ConfigError("teacher_server asks for each batch as the main process makes it: set "
                              "dataloader_num_workers: 0")
        if not self.teacher_server_timeout > 0:
            raise ConfigError(f"teacher_server_timeout must be > 0, got {self.teacher_server_timeout}")
        if self.teacher_server_retries < 1:
            raise ConfigError(f"teacher_server_retries must be >= 1, got {self.teacher_server_retries}")

    @property
    def every_step_generates(self) -> bool:
        """Every optimizer step trains on generated responses (a prompt-only dataset is then enough)."""
        fully_on_policy = (self.on_policy_fraction == 1 and self.on_policy_warmup_steps == 0
                           and self.on_policy_fraction_warmup_steps == 0)
        return fully_on_policy or self.seq_kd

    @property
    def generation_budget(self) -> int:
        """New tokens per generated response (on-policy / seq_kd): max_new_tokens or max_length - max_prompt_length."""
        return self.max_new_tokens or self.max_length - self.max_prompt_length

    def compile_loss_on(self, device_type: str) -> bool:
        """compile_loss resolved for a device: ``auto`` is on for CUDA only."""
        return device_type == "cuda" if self.compile_loss == "auto" else bool(self.compile_loss)

    def validate_for_training(self) -> None:
        """Checks that only matter when a run is about to start (paths and data are given)."""
        if not self.model_name_or_path:
            raise ConfigError("model_name_or_path is required: the student model folder or hub id")
        if self.kd_ratio > 0 and not (self.teacher_model_name_or_path or self.teacher_cache):
            raise ConfigError(
                f"teacher_model_name_or_path (or teacher_cache) is required when kd_ratio > 0 (got kd_ratio="
                f"{self.kd_ratio}); set kd_ratio: 0 for plain SFT"
            )
        if not self.dataset_name:
            raise ConfigError("dataset_name is required: a hub dataset id, a local data file or a folder")


def check_student_init_folder(path: str, use_peft: bool) -> str:
    """What ``student_init_from`` holds, ``"model"`` (config.json) or ``"adapter"`` (adapter_config.json, LoRA
    students only); :class:`ConfigError` naming the key otherwise."""
    folder = os.path.expanduser(path)
    if not os.path.isdir(folder):
        raise ConfigError(f"student_init_from: {path!r} is not a folder (give a local checkpoint folder, e.g. an "
                          "off-policy run's output_dir or a checkpoint-N inside it)")
    if use_peft and os.path.isfile(os.path.join(folder, "adapter_config.json")):
        return "adapter"
    if os.path.isfile(os.path.join(folder, "config.json")):
        return "model"
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise ConfigError(f"student_init_from: {path!r} holds a LoRA adapter (adapter_config.json) but use_peft is "
                          "false: set use_peft: true to keep training the adapter")
    raise ConfigError(f"student_init_from: {path!r} holds neither a model (config.json) nor a LoRA adapter "
                      "(adapter_config.json)")


def _check_outside_output_dir(path: str, output_dir: str | None) -> None:
    # The new run's checkpoint rotation and final save would delete or overwrite the checkpoint it starts from.
    if not output_dir:
        return
    source, output = (os.path.realpath(os.path.expanduser(p)) for p in (path, output_dir))
    if source == output or source.startswith(output + os.sep):
        raise ConfigError(f"student_init_from: {path!r} lies in this run's output_dir {output_dir!r}, whose "
                          "checkpoints and final model the run overwrites: give the new run its own output_dir "
                          "(resume_from_checkpoint continues the same run)")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name} must be a finite number > 0, got {value}")


def _in_range(name: str, value: float, low: float, high: float, closed: bool, low_closed: bool | None = None) -> None:
    low_ok = value >= low if (closed if low_closed is None else low_closed) else value > low
    high_ok = value <= high if closed else value < high
    if not (low_ok and high_ok):
        left = "[" if (closed if low_closed is None else low_closed) else "("
        right = "]" if closed else ")"
        raise ConfigError(f"{name} must be in {left}{low:g}, {high:g}{right}, got {value}")
