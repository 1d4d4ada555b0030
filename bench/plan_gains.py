"""Q4_K_M against a planned GGUF at its size, predicted and measured mean KLD (2 held-out windows of 256), with the
gains measured on the model ("after") or the demo-fitted ROLE_GAINS ("before").

    PYTHONPATH=. .venv/bin/python -m bench.plan_gains <demo|qwen3|olmo2|granite> <before|after> <work folder>
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, "tests")
from test_plan_models import gguf_logits, mean_kld, write

from bench.plan import checkpoint_for
from siliconvert.calibration import Calibration
from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.gguf import GGUFWriter
from siliconvert.quantize.sensitivity import error_of, gguf_kinds
from siliconvert.recipe import GGUFTarget
from siliconvert.textdata import heldout_text


def main(model, mode, out):
    if mode == "before":
        Calibration.gain = lambda self, name, tied_head=False: None
    path = checkpoint_for(model)
    ck = Checkpoint.open(path)
    from conftest import reference_logits_for
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(path).encode(heldout_text(), add_special_tokens=False)
    windows = np.array([ids[i*256:(i+1)*256] for i in range(2)])
    reference = reference_logits_for(path, windows)
    out = Path(out) / model / mode
    out.mkdir(parents=True, exist_ok=True)
    (fixed,) = write(GGUFWriter(ck, GGUFTarget(format="gguf", quants=["Q4_K_M"], imatrix="builtin"), out, "m"))
    size_mb = fixed.path.stat().st_size / 1e6
    writer = GGUFWriter(ck, GGUFTarget(format="gguf", quants=["auto"], plan={"size_mb": size_mb}), out, "m")
    (planned,) = write(writer)
    pred_fixed = error_of(writer.costs, gguf_kinds(fixed.path))
    pred_plan = writer.quant_plan.predicted_kld
    m_fixed = mean_kld(reference, gguf_logits(fixed.path, windows), windows)
    m_plan = mean_kld(reference, gguf_logits(planned.path, windows), windows)
    r = dict(model=model, mode=mode, q4km_kld=m_fixed, q4km_pred=pred_fixed, plan_kld=m_plan, plan_pred=pred_plan,
             plan_over_q4km=m_plan/m_fixed, q4km_meas_over_pred=m_fixed/pred_fixed,
             plan_meas_over_pred=m_plan/pred_plan,
             plan_mb=planned.path.stat().st_size/1e6, q4km_mb=size_mb)
    print(json.dumps(r))

if __name__ == "__main__":
    main(*sys.argv[1:])
