"""The one place where a run config becomes typed objects.

    plan = build_plan(config)          # after run_config.validate(config)
    plan.model.precision               # PrecisionConfig (the optimizer wrapper follows it)
    for stage in plan.stages:          # SFT warm-start (if any), then RL (if any)
        stage.grpo, stage.replay, stage.recap, stage.optimizer, stage.sampling_params(ids)

Every dataclass is built from its config section as a whole: a section's fields that a
dataclass declares go to it by name (``rl.epsilon_low`` -> ``GRPOConfig.epsilon_low``), and
the few that differ in meaning are converted here, once (``rl.dual_clip_c = 0`` -> None,
``rl.beta = -1`` -> the method's beta, ``rl.max_new_tokens`` -> the length limit of both the
sampler and the loss). A `_Reader` records every config leaf read while the plan is built;
`unread_fields` lists the others, and a test requires it to be empty for `base_config()` and
every file in configs/: a field nothing reads would be silently ignored.

Values are validated where their type lives (GRPOConfig, RecapConfig, ReplayConfig,
PrecisionConfig, MeshConfig check their own fields in ``__post_init__``); their errors are
re-raised as `run_config.ConfigError` naming ``config.<section>.<field>``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import optax

from recap_jax import grpo, lora, recap, run_config
from recap_jax.data.replay import MODOMODO_SHARES, ReplayConfig, epoch_steps
from recap_jax.data.tasks import get_task, styled_task_name, unstyled_task_name
from recap_jax.metrics_log import WandbConfig
from recap_jax.models.qwen2_5_vl import attention
from recap_jax.parallel import MeshConfig, parse_mesh_spec
from recap_jax.precision import PrecisionConfig
from recap_jax.run_config import ConfigError
from recap_jax.sampling import SamplingParams
from recap_jax.train_state import make_optimizer

__all__ = ["DataPlan", "ModelPlan", "RunPlan", "SourcePlan", "StagePlan", "build_plan",
           "objective_set", "unread_fields"]

SFT_RNG_OFFSET, RL_RNG_OFFSET = 0, 1_000_003  # step keys fold in (offset + step): disjoint


# --------------------------------------------------------------------------- config reading


class _Reader:
    """Reads a ConfigDict and remembers every leaf it handed out (dotted paths)."""

    def __init__(self, config):
        self.config = config
        self.read: set[str] = set()

    def get(self, path: str) -> Any:
        node = self.config
        for part in path.split("."):
            node = node[part]
        if not hasattr(node, "keys"):
            self.read.add(path)
        return node

    def section(self, path: str, names: Sequence[str] | None = None) -> dict[str, Any]:
        """{field: value} of a section's leaves (only ``names`` when given), all marked read."""
        node = self.get(path)
        keys = list(node.keys()) if names is None else [n for n in names if n in node]
        return {key: self.get(f"{path}.{key}") for key in keys}

    def fields_of(self, cls, path: str, exclude: Sequence[str] = ()) -> dict[str, Any]:
        """The section's values of the fields ``cls`` declares (by name), marked read."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in exclude]
        return self.section(path, names)


def _leaves(config, prefix: str = "") -> list[str]:
    out = []
    for key in config.keys():
        path = f"{prefix}{key}"
        value = config[key]
        out += _leaves(value, f"{path}.") if hasattr(value, "keys") else [path]
    return out


def unread_fields(config) -> list[str]:
    """Config leaves that building the plan does not read (should be none)."""
    reader = _Reader(config)
    _build(reader)
    return sorted(set(_leaves(config)) - reader.read)


def _as_config_error(section: str, error: Exception) -> ConfigError:
    """A dataclass's own validation error, renamed to the config field it came from."""
    message = re.sub(r"^\w+\.(\w+)", rf"config.{section}.\1", str(error))
    message = re.sub(r"^(precision|mesh)\.(\w+)", rf"config.{section}.\2", message)
    if not message.startswith("config."):
        message = f"config.{section}: {message}"
    return ConfigError(message)


def _make(cls, section: str, **kwargs):
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise _as_config_error(section, error) from None


# --------------------------------------------------------------------------- plan types


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """``config.model`` as a whole: which model, its precision, and the tiny preset's sizes."""

    path: str
    require_path: bool
    preset: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    text_layers: int
    heads: int
    kv_heads: int
    vision_depth: int
    vision_hidden_size: int
    rope_theta: float
    param_dtype: str
    compute_dtype: str
    remat: str
    logits_chunk: int
    freeze_vision: bool
    attention: str = "auto"  # one of attention.IMPLEMENTATIONS; build_run sets it
    lora: lora.LoraConfig | None = None  # model.lora (None: rank 0, full fine-tuning)
    lora_merge_on_export: bool = True

    def __post_init__(self):
        if self.attention not in attention.IMPLEMENTATIONS:
            raise ValueError(f"ModelPlan.attention={self.attention!r} is invalid; allowed: "
                             f"{' | '.join(attention.IMPLEMENTATIONS)}")

    @property
    def precision(self) -> PrecisionConfig:
        return PrecisionConfig(self.param_dtype, self.compute_dtype, self.remat)


@dataclasses.dataclass(frozen=True)
class TokenizerPlan:
    """``config.tokenizer``: the tokenizer directory ("" = the model's or the demo BPE)."""

    path: str
    min_pixels: int
    max_pixels: int


@dataclasses.dataclass(frozen=True)
class SourcePlan:
    """One entry of ``config.data.sources`` (see run_config.source_config); rewards () =
    the task's own, max_new_tokens 0 = rl.max_new_tokens."""

    name: str
    kind: str
    train: tuple[str, ...]
    eval: tuple[str, ...]
    image_root: str
    size: int
    eval_size: int
    max_records: int
    layout: str
    rewards: tuple[str, ...] = ()
    max_new_tokens: int = 0
    stop_strings: tuple[str, ...] = ()

    def paths(self, split: str) -> tuple[str, ...]:
        return self.train if split == "train" else self.eval


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """``config.data`` without the sources: prompt style, buckets and pipeline sizes.

    prompt_style: "bare" (the task registry's own prompts) or "released" (the authors' code's
      exact prompts, rewards and SFT targets: each source runs as its ``<name>_released`` task).
    """

    prompt_style: str
    prompt_buckets: tuple[int, ...]
    answer_buckets: tuple[int, ...]
    patch_buckets: tuple[int, ...]
    num_parallel_calls: int
    prefetch: int


@dataclasses.dataclass(frozen=True)
class BenchmarkPlan:
    """``config.eval.benchmarks*``: public benchmarks run at every evaluation (recap_jax.bench)."""

    specs: str
    prompt: str
    batch_size: int
    max_new_tokens: int
    limit: int


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One training stage: what it draws, how it is weighted, optimised and sampled.

    name: "sft" (warm-start: every source's targets as next-token prediction) or "rl".
    sources: the stage's source names in source-id order (the ids of `objectives`).
    objectives: the K objectives; lambda has one entry per objective.
    grpo: the loss (GRPOConfig) of the stage's batches of G rows per prompt.
    recap: the weight update (None: lambda = 1 for the baselines and the warm-start).
    optimizer: AdamW on the stage's schedule, with the float32 master copy when parameters
      are not float32, and the vision tower frozen where the method says so.
    max_new_tokens, temperature, top_p, top_k: the sampler's settings (RL only).
    max_bad_steps: non-finite steps in a row before the run saves and stops.
    rng_offset: step keys fold in (rng_offset + step).
    eval_every: steps between evaluations (0: at the start and the end of RL only; SFT: never).
    freeze_vision: the vision tower gets no updates and runs no backward pass (modomodo, or
      model.freeze_vision).
    reward_workers, reward_timeout_s: rewards scored by a reward_pool.RewardPool; which
      rewards each source has: ``objectives.sources[i].rewards``.
    dynamic_sampling_extra_draws: DAPO dynamic sampling's budget of extra sampling rounds
      per step (0: off).
    source_max_new_tokens, source_stop_strings: per source (in ``sources`` order), its
      completion limit (<= max_new_tokens) and stop strings, applied after sampling.
    log_lambda_effect: the step also logs the gradient cosine with lambda = 1.
    scale_logprobs: sampler and trainer log-probs at the sampling temperature.
    epoch_bounded: ``steps`` is to be replaced by one pass over the smallest source
      (`with_steps` once the sources are open); optimizer_for(steps) builds the optimizer of
      a run of that many steps.
    """

    name: str
    steps: int
    sources: tuple[str, ...]
    objectives: recap.ObjectiveSet
    grpo: grpo.GRPOConfig
    replay: ReplayConfig
    recap: recap.RecapConfig | None
    optimizer: optax.GradientTransformation = dataclasses.field(compare=False, repr=False)
    max_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_bad_steps: int = 5
    rng_offset: int = 0
    eval_every: int = 0
    freeze_vision: bool = False
    log_lambda_effect: bool = False
    scale_logprobs: bool = False
    epoch_bounded: bool = False
    optimizer_for: Any = dataclasses.field(default=None, compare=False, repr=False)
    reward_workers: int = 0
    reward_timeout_s: float = 10.0
    dynamic_sampling_extra_draws: int = 0
    source_max_new_tokens: tuple[int, ...] = ()
    source_stop_strings: tuple[tuple[str, ...], ...] = ()

    @property
    def is_rl(self) -> bool:
        return self.name == "rl"

    @property
    def reference(self) -> bool:
        """Whether the step needs the frozen reference policy (a KL term)."""
        return self.grpo.beta > 0

    def sampling_params(self, eos_token_id, pad_token_id: int) -> SamplingParams:
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p, self.top_k,
                              eos_token_id, pad_token_id, self.grpo.group_size,
                              scale_logprobs=self.scale_logprobs).validate()

    def with_steps(self, steps: int) -> StagePlan:
        """This stage run for ``steps`` steps (the optimizer's schedule follows)."""
        return dataclasses.replace(self, steps=steps, optimizer=self.optimizer_for(steps))

    def source_grpo(self, source: str) -> grpo.GRPOConfig:
        """The loss config of a batch of ``source``: an SFT source's rows are one per prompt;
        an RL source with its own completion limit has it as L_max (max_completion_length)."""
        if get_task(source).kind != "rl":
            return dataclasses.replace(self.grpo, group_size=1)
        limit = self.completion_limit(source)
        if limit == self.grpo.max_completion_length:
            return self.grpo
        return dataclasses.replace(self.grpo, max_completion_length=limit)

    def completion_limit(self, source: str) -> int:
        """The source's max_new_tokens (the stage's when it sets none)."""
        i = self.sources.index(source)
        own = self.source_max_new_tokens[i] if self.source_max_new_tokens else 0
        return own or self.max_new_tokens

    def stop_strings(self, source: str) -> tuple[str, ...]:
        return self.source_stop_strings[self.sources.index(source)] \
            if self.source_stop_strings else ()


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """The whole run, typed: built once by `build_plan`, read by everything else."""

    seed: int
    model: ModelPlan
    tokenizer: TokenizerPlan
    mesh: MeshConfig | None
    data: DataPlan
    sources: tuple[SourcePlan, ...]
    stages: tuple[StagePlan, ...]
    checkpoint_every: int
    checkpoint_keep: int
    eval_num_examples: int
    eval_batch_size: int
    eval_max_new_tokens: int
    eval_image_reliance: bool
    benchmarks: BenchmarkPlan
    log_every: int
    tensorboard: bool
    wandb: WandbConfig
    ignore_memory_plan: bool = False

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sources)

    def stage(self, name: str) -> StagePlan | None:
        return next((s for s in self.stages if s.name == name), None)

    def bounded_by_data(self, train_sources) -> RunPlan:
        """With ``rl.epoch_bounded``: the RL stage run for one pass until its smallest source
        is exhausted (replay.epoch_steps, batches of one source each), given the opened train
        sources in source-id order; otherwise this plan unchanged."""
        rl = self.stage("rl")
        if rl is None or not rl.epoch_bounded:
            return self
        sizes = [len(train_sources[self.source_names.index(n)]) for n in rl.sources]
        steps = epoch_steps(sizes, rl.replay.batch_size)
        stages = tuple(s.with_steps(steps) if s is rl else s for s in self.stages)
        return dataclasses.replace(self, stages=stages)


# --------------------------------------------------------------------------- building


def objective_set(names: Sequence[str], rewards: dict[str, tuple[str, ...]] | None = None
                  ) -> recap.ObjectiveSet:
    """The objectives of sources ``names``, from the task registry (the one place that says
    which source is RL with which rewards and which is SFT); ``rewards``: {name: reward
    names} replacing a source's registered rewards (``data.sources.<name>.rewards``)."""
    rewards = rewards or {}
    return recap.ObjectiveSet([(n, get_task(n).kind, rewards.get(n) or get_task(n).rewards)
                               for n in names])


def build_plan(config, *, check_paths: bool = True) -> RunPlan:
    """The RunPlan of a config, validated first (run_config.validate, then each type's own
    checks); a ConfigError names the first invalid field."""
    run_config.validate(config, check_paths=check_paths)
    return _build(_Reader(config))


def _build(reader: _Reader) -> RunPlan:
    config = reader.config
    seed = reader.get("seed")
    plain = [f.name for f in dataclasses.fields(ModelPlan) if not f.name.startswith("lora")]
    model = _make(ModelPlan, "model", **reader.section("model", plain), **_lora(reader))
    _make(PrecisionConfig, "model", param_dtype=model.param_dtype,
          compute_dtype=model.compute_dtype, remat=model.remat)
    tokenizer = TokenizerPlan(**reader.section("tokenizer"))
    keys = run_config.source_names(config)
    reader.get("data.primary")
    data = DataPlan(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                       for k, v in reader.fields_of(DataPlan, "data").items()})
    try:  # the task each source runs as: its key, or the key's released-style variant
        names = [styled_task_name(key, data.prompt_style) for key in keys]
    except ValueError as error:
        raise ConfigError(f"config.data.prompt_style={data.prompt_style!r}: {error}") from None
    sources = tuple(_source_plan(reader, key, name) for key, name in zip(keys, names))
    stages = tuple(s for s in (_sft_stage(reader, model, data, names, seed),
                               _rl_stage(reader, model, data, names, seed, sources))
                   if s is not None)
    return RunPlan(
        seed=seed, model=model, tokenizer=tokenizer, mesh=_mesh(reader), data=data,
        sources=sources, stages=stages,
        checkpoint_every=reader.get("checkpoint.every_steps"),
        checkpoint_keep=reader.get("checkpoint.keep"),
        eval_num_examples=reader.get("eval.num_examples"),
        eval_batch_size=reader.get("eval.batch_size"),
        eval_max_new_tokens=reader.get("eval.max_new_tokens"),
        eval_image_reliance=reader.get("eval.image_reliance"),
        benchmarks=BenchmarkPlan(**{field: reader.get(f"eval.benchmarks{suffix}") for field, suffix in (
            ("specs", ""), ("prompt", "_prompt"), ("batch_size", "_batch_size"),
            ("max_new_tokens", "_max_new_tokens"), ("limit", "_limit"))}),
        log_every=reader.get("log.every_steps"), tensorboard=reader.get("log.tensorboard"),
        ignore_memory_plan=reader.get("run.ignore_memory_plan"),
        wandb=_make(WandbConfig, "log", enabled=reader.get("log.wandb"),
                    **{field: reader.get(f"log.wandb_{field}")
                       for field in ("project", "run_name", "mode", "entity")}))


def _lora(reader: _Reader) -> dict[str, Any]:
    """ModelPlan's lora fields from ``config.model.lora`` (rank 0: None)."""
    fields = reader.section("model.lora")
    merge = fields.pop("merge_on_export")
    if not isinstance(merge, bool):
        raise ConfigError(f"config.model.lora.merge_on_export={merge!r} is invalid; allowed: True | False")
    if fields["rank"] == 0:
        return dict(lora=None, lora_merge_on_export=merge)
    try:
        config = lora.LoraConfig(rank=fields["rank"], alpha=fields["alpha"], dropout=fields["dropout"],
                                 targets=lora.target_patterns(fields["targets"]))
    except ValueError as error:  # LoraConfig names model.lora.<field>
        raise ConfigError(f"config.{error}") from None
    return dict(lora=config, lora_merge_on_export=merge)


def _source_plan(reader: _Reader, key: str, name: str) -> SourcePlan:
    values = reader.section(f"data.sources.{key}")
    for split in ("train", "eval"):
        values[split] = tuple(p.strip() for p in str(values[split]).split(",") if p.strip())
    if "rewards" in values:
        values["rewards"] = run_config.source_rewards(values)
    if "stop_strings" in values:
        values["stop_strings"] = tuple(values["stop_strings"])
    return _make(SourcePlan, f"data.sources.{key}", name=name, **values)


def mesh_plan(config) -> MeshConfig | None:
    """The run's mesh alone, from ``config.mesh`` (what must start before anything touches
    the devices: jax.distributed on a multi-host run)."""
    return _mesh(_Reader(config))


def _mesh(reader: _Reader) -> MeshConfig | None:
    fields = reader.section("mesh")
    spec = fields.pop("spec")
    if not spec:
        if fields["distributed"]:
            raise ConfigError("config.mesh.distributed=True needs config.mesh.spec (e.g. "
                              "'fsdp=-1'): a multi-host run shards over a mesh")
        return None
    try:
        sizes = parse_mesh_spec(spec)
    except ValueError as error:
        raise ConfigError(f"config.mesh.spec={spec!r}: {error}") from None
    explicit = dict(coordinator_address=fields["coordinator_address"] or None,
                    num_processes=fields["num_processes"] or None,
                    process_id=None if fields["process_id"] < 0 else fields["process_id"])
    return _make(MeshConfig, "mesh", data=sizes.data, fsdp=sizes.fsdp, tensor=sizes.tensor,
                 distributed=fields["distributed"], **explicit)


def _optimizer(learning_rate, total_updates, warmup_fraction, max_grad_norm, weight_decay,
               precision: PrecisionConfig, freeze_vision: bool,
               accumulate: int = 1, adapters: bool = False) -> optax.GradientTransformation:
    """AdamW on the stage's schedule; gradients averaged over ``accumulate`` calls before each
    update (optax.MultiSteps: the calls in between change nothing); a float32 master copy for
    low-precision parameters; zero updates for the vision tower when it is frozen (the master
    copy wraps the whole thing, so a frozen weight stays bit-identical).

    ``adapters`` (LoRA): params are {"base", "adapters"}; AdamW runs on the float32 adapters
    only (no master copy needed), the base gets zero updates and no state."""
    optimizer = make_optimizer(learning_rate, max(total_updates // accumulate, 1),
                               warmup_fraction=warmup_fraction, max_grad_norm=max_grad_norm,
                               weight_decay=weight_decay)
    if accumulate > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=accumulate)
    if adapters:  # the frozen vision tower has no adapters (checked in _rl_stage)
        return lora.adapter_optimizer(optimizer)
    if freeze_vision:
        optimizer = optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()},
                                          _vision_labels)
    return precision.wrap_optimizer(optimizer)


def _vision_labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if "visual" in jax.tree_util.keystr(path) else "trained", params)


def _replay(data: DataPlan, seed: int, **kwargs) -> ReplayConfig:
    return _make(ReplayConfig, "data", seed=seed, prompt_buckets=data.prompt_buckets,
                 answer_buckets=data.answer_buckets, patch_buckets=data.patch_buckets,
                 num_parallel_calls=data.num_parallel_calls, prefetch=data.prefetch, **kwargs)


def _sft_stage(reader: _Reader, model: ModelPlan, data: DataPlan, names, seed) -> StagePlan | None:
    sft = reader.section("sft")
    max_bad_steps = reader.get("rl.max_bad_steps")
    if sft["steps"] == 0:
        return None
    objectives = objective_set_sft(names)
    table = grpo.GRPOConfig(group_size=1, reward_objective_index=((-1,),) * len(names),
                            sft_objective_index=tuple(range(len(names))))
    shares = sft["source_shares"]
    replay = _replay(data, seed, batch_size=sft["batch_size"],
                     strategy="modomodo" if shares else "uniform", homogeneous=False,
                     weights=run_config.parse_shares(shares, len(names)) if shares else None)
    optimizer = _optimizer(sft["learning_rate"], sft["steps"], sft["warmup_fraction"],
                           sft["max_grad_norm"], sft["weight_decay"], model.precision, False,
                           adapters=model.lora is not None)
    return StagePlan("sft", sft["steps"], tuple(names), objectives, table, replay, None,
                     optimizer, max_bad_steps=max_bad_steps,
                     rng_offset=SFT_RNG_OFFSET)


def objective_set_sft(names: Sequence[str]) -> recap.ObjectiveSet:
    """The warm-start's objectives: every source as next-token prediction (``<name>/ntp``)."""
    return recap.ObjectiveSet([(name, "sft", ()) for name in names])


_RL_STAGE_FIELDS = ("steps", "method", "prompts_per_step", "max_new_tokens", "temperature",
                    "top_p", "top_k", "learning_rate", "warmup_fraction", "max_grad_norm",
                    "weight_decay", "beta", "dual_clip_c", "max_bad_steps", "log_lambda_effect",
                    "sources_per_update", "scale_logprobs", "epoch_bounded", "tis_cap",
                    "reward_workers", "reward_timeout_s", "dynamic_sampling_extra_draws")


def _rl_stage(reader: _Reader, model: ModelPlan, data: DataPlan, names, seed,
              sources: Sequence[SourcePlan]) -> StagePlan | None:
    rl = reader.section("rl", _RL_STAGE_FIELDS)
    method = run_config.METHODS[rl["method"]]
    primary = names[0]
    used = tuple(names) if method.replay else (primary,)
    by_name = {s.name: s for s in sources}
    own = [by_name[n] for n in used]
    objectives = objective_set(used, {s.name: s.rewards for s in own if s.rewards})
    loss_fields = reader.fields_of(grpo.GRPOConfig, "rl", exclude=("beta", "dual_clip_c", "tis_cap"))
    recap_fields = reader.section("recap")
    shares = reader.get("data.modomodo_shares")
    eval_every = reader.get("eval.every_steps")
    if rl["steps"] == 0:  # a warm-start only: no RL machinery
        return None
    grpo_config = _make(
        grpo.GRPOConfig.for_objectives, "rl", objectives=objectives, **loss_fields,
        beta=method.beta if rl["beta"] == -1 else rl["beta"],
        dual_clip_c=rl["dual_clip_c"] or None, max_completion_length=rl["max_new_tokens"],
        tis_cap=rl["tis_cap"] or None)
    recap_config = None
    if method.recap:
        recap_config = _make(objectives.recap_config, "recap", **recap_fields,
                             max_steps=max(rl["steps"], 1))
    weights = None
    if rl["method"] == "modomodo":
        weights = (run_config.parse_shares(shares, len(used)) if shares
                   else tuple(MODOMODO_SHARES[unstyled_task_name(n)] for n in used))
    replay = _replay(data, seed, batch_size=rl["prompts_per_step"], strategy=method.strategy,
                     homogeneous=True, primary=(primary,), weights=weights)
    def optimizer_for(steps: int) -> optax.GradientTransformation:
        updates = steps * grpo_config.num_iterations * grpo_config.num_minibatches
        return _optimizer(rl["learning_rate"], updates, rl["warmup_fraction"],
                          rl["max_grad_norm"], rl["weight_decay"], model.precision,
                          method.freeze_vision, rl["sources_per_update"],
                          adapters=model.lora is not None)

    freeze_vision = method.freeze_vision or model.freeze_vision
    if freeze_vision and model.lora is not None and any(p in lora.VISION_TARGETS
                                                        for p in model.lora.patterns):
        raise ConfigError(f"config.model.lora.targets adapts the vision tower, which "
                          f"{'rl.method=' + rl['method'] if method.freeze_vision else 'model.freeze_vision'}"
                          " freezes; drop 'vision' from model.lora.targets")

    stage = StagePlan("rl", rl["steps"], used, objectives, grpo_config, replay, recap_config,
                      optimizer_for(rl["steps"]), max_new_tokens=rl["max_new_tokens"],
                      temperature=rl["temperature"], top_p=rl["top_p"], top_k=rl["top_k"],
                      max_bad_steps=rl["max_bad_steps"], rng_offset=RL_RNG_OFFSET,
                      eval_every=eval_every,
                      freeze_vision=freeze_vision,
                      log_lambda_effect=rl["log_lambda_effect"],
                      scale_logprobs=rl["scale_logprobs"], epoch_bounded=rl["epoch_bounded"],
                      optimizer_for=optimizer_for, reward_workers=rl["reward_workers"],
                      reward_timeout_s=rl["reward_timeout_s"],
                      dynamic_sampling_extra_draws=rl["dynamic_sampling_extra_draws"],
                      source_max_new_tokens=tuple(s.max_new_tokens for s in own),
                      source_stop_strings=tuple(s.stop_strings for s in own))
    for key, source in zip(run_config.source_names(reader.config), sources):
        if source.name in used:  # a source's own limit must suit the loss (overlong buffer)
            try:
                stage.source_grpo(source.name)
            except ValueError as error:
                raise ConfigError(f"config.data.sources.{key}.max_new_tokens="
                                  f"{source.max_new_tokens}: {error}") from None
    return stage
