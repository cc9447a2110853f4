"""The actor-side half of a model: one vLLM engine replica.

Only this module imports vLLM, and only when a :class:`Replica` is created
(inside a Ray actor), so job definitions and the driver stay light.

Why the offline ``vllm.LLM`` engine, and in the actor's own process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on CPU: Ray Data already pipelines
batches into each actor, and ``LLM.generate`` on a whole batch lets vLLM's
scheduler batch continuously within it, so an async engine would add a
thread/event-loop hop and buy nothing for offline batches. On this 2-core CPU
machine the in-process engine was the fastest to start and the smallest
(~1.3 GiB RSS vs ~2.7 GiB and 12-30 s start for the multiprocess engine, as
measured for the project's FACTS.md); a tiny model's replica was ready ~12 s
after actor start, most of it importing torch and vLLM. On GPUs vLLM's
defaults apply; ``Model.engine`` passes any ``vllm.LLM`` option.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .adapters import lora_rank_for, resolve, served_name
from .config import Model
from .errors import ConfigError, EngineError, EngineOptionsError

log = logging.getLogger(__name__)

#: Distinct prompts whose token ids a replica keeps (:meth:`Replica.encode_chat`).
PROMPTS_KEPT = 65_536

#: KV cache per CPU replica when the user sets nothing (GiB). vLLM's own
#: default sizing reads the NUMA node's memory and fails on small VMs.
DEFAULT_CPU_KV_CACHE_GIB = 1


def cpu_engine_env(model: Model | None = None) -> dict[str, str]:
    """Environment a CPU replica needs before vLLM is imported."""
    env = {
        # Engine core in this process: fastest start and lowest memory on CPU.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_CPU_KV_CACHE_GIB)),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    if model is not None and model.threads is not None:
        # Ray sets OMP_NUM_THREADS=floor(num_cpus) in its workers; the engine's
        # thread count is Model.threads instead. Read by OpenMP when torch is
        # first imported; set_engine_threads covers a torch imported earlier.
        env["OMP_NUM_THREADS"] = str(model.threads)
    return env


def set_engine_threads(threads: int) -> None:
    """Run this process's CPU engine on ``threads`` intra-op threads (torch and OpenMP).

    Must run before the engine starts. ``torch._C.set_num_threads`` rather than
    ``torch.set_num_threads``: vLLM's CPU worker replaces the latter with a
    no-op once an engine has started in the process (it binds its threads
    then), so a second replica in the same process would silently keep the
    first one's count. vLLM's own thread binding (``VLLM_CPU_OMP_THREADS_BIND``)
    applies only to its multiprocess executor, which a CPU replica does not use
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): ``OMP_NUM_THREADS`` and torch's
    count are what the in-process engine runs on.
    """
    import torch

    torch._C.set_num_threads(threads)


def engine_threads() -> int:
    """Intra-op threads the engine in this process runs on."""
    import torch

    return torch.get_num_threads()


#: CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic: x86 AVX512-BF16 and AMX, Arm's BF16.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """True when this CPU computes bf16 natively (``cpuinfo``: the text of ``/proc/cpuinfo``)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    return not BF16_FLAGS.isdisjoint(cpuinfo.split())


def default_cpu_dtype(cpuinfo: str | None = None) -> str:
    """The dtype a CPU replica runs when ``Model.engine`` sets none: bf16 only where the CPU has it.

    vLLM's ``auto`` picks bf16 on every CPU. Without bf16 instructions torch
    emulates it: a MiniLM classifier ran ~10x slower in bf16 than in fp32
    (14-28 vs 145-235 rows/s) on such a 2-core machine, and the demo's
    replica 34 rows/s against ~224 raw fp32 (issue 13). With them (avx512_bf16
    or AMX) bf16 is the faster one and halves the weights' memory.
    """
    return "bfloat16" if cpu_has_bf16(cpuinfo) else "float32"


def engine_kwargs(model: Model, lora_ranks: Sequence[int] = ()) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM``: slmbatch defaults overlaid by ``Model.engine``.

    ``lora_ranks``: one per distinct adapter the replica serves. Multi-LoRA
    then gets a slot per adapter plus a spare one: vLLM's CPU LoRA kernels
    read a request without an adapter from the *last* slot (index -1), so with
    every slot filled a base-model request in a mixed batch was answered by
    the last adapter (``docs/multi-lora-cpu.md``; vllm PR #48421).
    """
    kwargs: dict[str, Any] = {
        "model": model.name,
        # A per-request seed kills the CPU engine under chunked prefill; one
        # engine-wide seed keeps sampling reproducible instead.
        "seed": 0,
        # Compact JSON: small models otherwise emit runaway whitespace.
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
    }
    if not model.on_gpu:
        # Compiled mode cost ~20 s of start-up on CPU and ran slower.
        kwargs["enforce_eager"] = True
        kwargs["dtype"] = default_cpu_dtype()
    if lora_ranks:
        kwargs.update(
            enable_lora=True,
            max_loras=len(lora_ranks) + 1,
            max_cpu_loras=len(lora_ranks) + 1,
            max_lora_rank=lora_rank_for(lora_ranks),
        )
    kwargs.update(dict(model.engine))
    return kwargs


def engine_option_names() -> frozenset[str]:
    """The options ``vllm.LLM`` takes: the fields of ``vllm.EngineArgs``.

    Read from vLLM's source (``vllm/engine/arg_utils.py``: the dataclass's annotated
    names) without importing vLLM, which takes ~8 s on 2 cores; vLLM is imported
    only where its source does not say it plainly (another layout, a base class).
    """
    import ast

    for node in _vllm_source("engine", "arg_utils.py"):
        if isinstance(node, ast.ClassDef) and node.name == "EngineArgs" and not node.bases:
            names = {
                item.target.id
                for item in node.body
                if isinstance(item, ast.AnnAssign)
                and isinstance(item.target, ast.Name)
                and "ClassVar" not in ast.unparse(item.annotation)
            }
            if "model" in names:
                return frozenset(names)
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    return frozenset(f.name for f in dataclasses.fields(EngineArgs))


def _vllm_source(*path: str) -> list[Any]:
    """The top-level statements of a module of vLLM's (``path`` below its package), parsed from its
    source without importing vLLM; [] where the file is not there or does not parse."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("vllm")  # a top-level package: found, not imported
    if spec is None or not spec.origin:
        return []
    with contextlib.suppress(OSError, SyntaxError, ValueError):
        with open(os.path.join(os.path.dirname(spec.origin), *path), encoding="utf-8") as f:
            return ast.parse(f.read()).body
    return []


def engine_dtypes() -> frozenset[str] | None:
    """The ``dtype`` strings ``vllm.LLM`` accepts (vLLM's ``ModelDType``, read from its source like
    :func:`engine_option_names`); None where its source does not say it plainly."""
    import ast

    for node in _vllm_source("config", "model.py"):
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "ModelDType" for t in targets):
                with contextlib.suppress(ValueError):
                    value = node.value
                    if isinstance(value, ast.Subscript) and ast.unparse(value.value) == "Literal":
                        dtypes = ast.literal_eval(value.slice)
                        if isinstance(dtypes, tuple) and all(isinstance(d, str) for d in dtypes):
                            return frozenset(dtypes)
    return None


#: config.json keys vLLM takes a model's context length from: the smallest one present, or
#: ``model_max_length`` where set (``vllm/transformers_utils/model_arch_config_convertor.py``).
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)


def model_context(model: Model) -> tuple[str, int] | None:
    """``(config.json key, tokens)``: the longest ``max_model_len`` vLLM starts ``model`` with, read from
    its local config.json (:meth:`Model.local_config`). None where that cannot be told without vLLM: a
    model that is not a local directory, a RoPE scaling factor (vLLM scales the context by it), a
    Sentence Transformers config (vLLM takes its ``max_seq_length`` instead), or a model
    whose config names no context length (vLLM then accepts any)."""
    import glob

    try:
        config = model.local_config()
    except (OSError, ValueError):  # unreadable: the replica's start will say so
        return None
    if not isinstance(config, dict) or glob.glob(
        os.path.join(os.path.expanduser(model.name), "sentence_*_config.json")
    ):
        return None
    text = config.get("text_config")
    text = text if isinstance(text, dict) else config
    for key in ("rope_scaling", "rope_parameters"):
        rope = text.get(key)
        if isinstance(rope, dict) and any(
            isinstance(p, dict) and p.get("factor") is not None for p in (rope, *rope.values())
        ):
            return None
    found = {
        key: text[key] for key in CONTEXT_KEYS if isinstance(text.get(key), int) and not isinstance(text[key], bool)
    }
    if "model_max_length" in found:
        return "model_max_length", found["model_max_length"]
    return min(found.items(), key=lambda item: item[1]) if found else None


def check_engine_options(model: Model, field: str) -> None:
    """Reject, without starting an engine, ``Model.engine`` options vLLM would refuse when a replica
    starts: keys ``vllm.EngineArgs`` does not know (:func:`engine_option_names`), a ``dtype`` it does
    not know (:func:`engine_dtypes`), a ``max_model_len`` over the model's context (:func:`model_context`,
    unless ``VLLM_ALLOW_LONG_MAX_MODEL_LEN`` is set). ``field``: where ``model`` is in the job."""
    if not model.engine:
        return
    known = engine_option_names()
    for key in model.engine:
        if key not in known:
            raise ConfigError(f"{field}.engine.{key}", f"vllm.LLM has no option {key!r}")
    dtype = model.engine.get("dtype")
    dtypes = engine_dtypes() if isinstance(dtype, str) else None
    if dtypes is not None and dtype not in dtypes:
        raise ConfigError(f"{field}.engine.dtype", f"vLLM knows no dtype {dtype!r} (it takes {sorted(dtypes)})")
    length = model.engine.get("max_model_len")
    allowed = os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0").strip().lower() in ("1", "true")  # as vLLM reads it
    if not isinstance(length, int) or isinstance(length, bool) or allowed:
        return
    context = model_context(model)
    if context is not None and length > context[1]:
        raise ConfigError(
            f"{field}.engine.max_model_len",
            f"{length} is more than model {model.name}'s context, {context[0]}={context[1]} in its config.json; "
            "vLLM would refuse to start it",
        )


def check_output_budget(stage: Any, field: str) -> None:
    """Reject, without starting an engine, a stage whose answer budget (``max_output_tokens``) alone
    fills the context its model starts with (``Model.engine["max_model_len"]``, else
    :func:`model_context`): no prompt would fit, and the replica's start would refuse the job.
    ``field``: where ``stage`` is in the job. Unknown contexts pass (the replica's start checks)."""
    option = stage.output_budget_field
    if not option:  # no answer budget to check (classify)
        return
    length = stage.model.engine.get("max_model_len")
    if not isinstance(length, int) or isinstance(length, bool):
        context = model_context(stage.model)
        length = context[1] if context else None
    if length is None:
        return
    budget = stage.reserved_output_tokens()
    if budget >= length:
        raise ConfigError(
            f"{field}.{option}",
            f"{budget} tokens for the answer leave no room for a prompt in model {stage.model.name}'s "
            f"max_model_len of {length}; lower {option} or raise max_model_len (Model.engine)",
        )


def sampling_params(
    *,
    max_tokens: int,
    min_tokens: int = 0,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    json_schema: Mapping[str, Any] | None = None,
) -> Any:
    """vLLM ``SamplingParams`` for greedy decoding, constrained to ``json_schema`` when given."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        structured_outputs=None if json_schema is None else StructuredOutputsParams(json=dict(json_schema)),
    )


def prompt_ids(tokenizer: Any, runner: str, system: str, user: str) -> list[int]:
    """The token ids a model gets for one request: a generative model's chat template (system +
    user + generation prompt), or - pooling classifiers, models without a template - the plain
    text with the tokenizer's special tokens. Replicas and fine-tuning (:mod:`slmbatch.finetune`)
    both build prompts here, so an adapter is trained on exactly what it is served."""
    if runner == "pooling" or not getattr(tokenizer, "chat_template", None):
        text = user if not system or runner == "pooling" else f"{system}\n\n{user}"
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


@contextlib.contextmanager
def heap_frozen_after() -> Iterator[None]:
    """Import torch and vLLM without garbage collection, then freeze what they left.

    Importing them leaves ~740,000 objects that the collector tracks and that live as long as the
    process (``len(gc.get_objects())`` after ``from vllm import LLM``); Python's
    collector walked them again and again during the import, and the engine's start-up runs
    five full collections more (~0.25 s apiece on 2 cores). Collected once and frozen, the
    later collections skip them: ~2 CPU-seconds (~19%) less from ``import`` to a started
    ``LLM`` on the test classifier, 2 cores (``benchmarks/engine_start.py``). The one
    collection before the freeze keeps no garbage of the import for good. vLLM freezes
    its own heap the same way once its engine has started.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.collect()
        gc.freeze()


def options_refused(exc: BaseException) -> bool:
    """Whether vLLM refused to start because of the options it was given: its configs are pydantic
    dataclasses, and a value they do not take (a dtype it does not know, a ``max_model_len`` over
    the model's) fails their validation. Any other failure (memory, a missing model, a bug) is not."""
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover - a dependency of vLLM
        return False
    return isinstance(exc, ValidationError)


def start_failure(exc: BaseException) -> str:
    """Why an engine did not start, on one line: the reasons a pydantic validation gives (without its
    boilerplate: the input repeated, a documentation link), else the exception's type and message."""
    reason = f"{type(exc).__name__}: {exc}"
    if options_refused(exc):
        parts: dict[str, str] = {}
        for error in exc.errors(include_url=False, include_input=False):  # type: ignore[attr-defined]
            cause = (error.get("ctx") or {}).get("error")
            where = ".".join(str(part) for part in error["loc"][:1])
            text = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else error["msg"]
            parts.setdefault(where, f"{where}: {text}" if where else text)
        reason = f"{type(exc).__name__} ({exc.title}): {'; '.join(parts.values())}"  # type: ignore[attr-defined]
    return " ".join(reason.split())


class Replica:
    """One vLLM engine for one :class:`~slmbatch.Model`, living in the calling process.

    Exposes exactly what stages need: chat rendering + tokenization, generate,
    classify, and the model's limits. ``adapters``: the LoRA adapters of the
    stages it serves (:mod:`slmbatch.adapters`), each checked before the engine
    starts (a mapping names, for each, where the job sets it: the errors say so);
    :meth:`serving` gives a stage the replica as its adapter sees it.
    """

    def __init__(self, model: Model, adapters: Sequence[str] | Mapping[str, str] = ()):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # engine chatter drowns the job's own logs
        with heap_frozen_after():
            if not model.on_gpu:
                os.environ.update(cpu_engine_env(model))
                if model.threads is not None:
                    set_engine_threads(model.threads)
            try:
                from vllm import LLM
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise EngineError(
                    "vLLM is not installed: pip install 'slmbatch[cpu]' (CPU) or 'slmbatch[gpu]' (GPU)"
                ) from exc
        self.model = model
        self.model_name = model.name
        #: adapter (as the stage names it) -> (local directory, rank)
        self.adapters: dict[str, tuple[str, int]] = {}
        fields = adapters if isinstance(adapters, Mapping) else dict.fromkeys(adapters, "adapter")
        for adapter, field in fields.items():
            self.adapters[adapter] = resolve(adapter, model.name, model.engine.get("max_lora_rank"), field)
        self._lora: dict[str, Any] = {}
        log.info("starting vLLM replica of %s", model.name)
        try:
            self.llm = LLM(**engine_kwargs(model, [r for _, r in self.adapters.values()]))
        except Exception as exc:
            message = f"could not start vLLM for model {model.name!r}: {start_failure(exc)}"
            if options_refused(exc):
                raise EngineOptionsError("Model.engine", message) from exc
            raise EngineError(message) from exc
        #: Intra-op threads the CPU engine runs on (None on GPU): Model.threads,
        #: or what Ray gave the actor (OMP_NUM_THREADS = floor(num_cpus), at least 1).
        self.threads: int | None = None if model.on_gpu else engine_threads()
        config = self.llm.llm_engine.model_config
        self.runner: str = config.runner_type
        self.max_model_len: int = config.max_model_len
        self.tokenizer = self.llm.get_tokenizer()
        hf_config = config.hf_config
        self.id2label: dict[int, str] = {int(k): v for k, v in (getattr(hf_config, "id2label", None) or {}).items()}
        self.eos_token_id = self.tokenizer.eos_token_id
        self.dtype = str(config.dtype).removeprefix("torch.")
        where = f"GPU x {model.num_gpus:g}" if model.on_gpu else f"CPU, {self.threads} thread(s)"
        #: What this replica runs on, for the run summary: e.g. "float32, CPU, 2 thread(s)".
        self.description = f"{self.dtype}, {where}"
        self._prompt_ids = functools.lru_cache(maxsize=PROMPTS_KEPT)(self._tokenise_chat)
        if self.adapters:
            from vllm.lora.request import LoRARequest

            self._lora = {
                name: LoRARequest(name, i, path) for i, (name, (path, _)) in enumerate(self.adapters.items(), 1)
            }

    def serving(self, adapter: str | None) -> Replica | AdapterView:
        """This replica as a stage with ``adapter`` uses it (itself when None)."""
        if adapter is None:
            return self
        if adapter not in self._lora:
            raise EngineError(f"replica of {self.model_name} was not started with adapter {adapter!r}")
        return AdapterView(self, adapter, self._lora[adapter])

    # -- prompts ------------------------------------------------------------------

    def encode_chat(self, system: str, user: str) -> list[int]:
        """Token ids of the prompt for one request.

        Generative models get their chat template (system + user + generation
        prompt); pooling classifiers get the plain text with the tokenizer's
        special tokens, as they were trained. Repeated prompts (nightly input
        repeats itself) are tokenised once: the last :data:`PROMPTS_KEPT` are kept.
        """
        return list(self._prompt_ids(system, user))

    def _tokenise_chat(self, system: str, user: str) -> tuple[int, ...]:
        return tuple(prompt_ids(self.tokenizer, self.runner, system, user))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- inference --------------------------------------------------------------------

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        max_tokens: int,
        min_tokens: int = 0,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        json_schema: Mapping[str, Any] | None = None,
        lora: Any = None,
    ) -> list[Any]:
        """Greedy completions of ``prompt_ids`` (vLLM ``RequestOutput`` objects), decoding
        constrained to ``json_schema`` when given (structured outputs, xgrammar); ``lora``:
        a ``LoRARequest`` every prompt runs with (:meth:`serving`)."""
        params = sampling_params(
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            json_schema=json_schema,
        )
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        return self.llm.generate(prompts, params, use_tqdm=False, lora_request=lora)

    def classify(self, prompt_ids: Sequence[Sequence[int]], lora: Any = None) -> list[list[float]]:
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        return [out.outputs.probs for out in self.llm.classify(prompts, use_tqdm=False, lora_request=lora)]

    def shutdown(self) -> None:
        """Free the engine now rather than at interpreter exit."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        del llm
        gc.collect()


class AdapterView:
    """A :class:`Replica` as one LoRA adapter's stage sees it: every generate and classify call
    runs with that adapter, and ``model_name`` names it. Prompts and limits are the base model's."""

    def __init__(self, replica: Replica, adapter: str, lora: Any):
        self.replica = replica
        self.adapter = adapter
        self.lora = lora
        self.model_name = served_name(replica.model_name, adapter)
        self.runner = replica.runner
        self.max_model_len = replica.max_model_len
        self.eos_token_id = replica.eos_token_id
        self.id2label = replica.id2label

    def encode_chat(self, system: str, user: str) -> list[int]:
        return self.replica.encode_chat(system, user)

    def encode(self, text: str) -> list[int]:
        return self.replica.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.replica.decode(ids)

    def generate(self, prompt_ids: Sequence[Sequence[int]], **options: Any) -> list[Any]:
        return self.replica.generate(prompt_ids, lora=self.lora, **options)

    def classify(self, prompt_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        return self.replica.classify(prompt_ids, lora=self.lora)

    def serving(self, adapter: str | None) -> Replica | AdapterView:
        return self.replica.serving(adapter)
