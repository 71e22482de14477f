"""scripts/plan.py: the README's plan table, from shapes only (seconds, nothing allocated)."""

from script_entry import script_namespace

from lens.core import plan as PL


def test_plan_rows_match_the_library(capsys):
    ns = script_namespace("plan")
    assert ns["main"](["--model", "qwen1.5-1.8b", "--workload", "generate", "--hardware", "tpu-v4-8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[2].startswith("| qwen1.5-1.8b | generate (batch=8, slots=2048) | tpu-v4-8")
    p = PL.plan(ns["MODELS"]["qwen1.5-1.8b"], {"data": 1, "model": 4}, "generate", dtype="bfloat16",
                batch=8, slots=2048)
    # KV cache: 8 rows x 2 (k, v) x 24 layers x 2048 slots x 16/4 kv heads x 128 x 2 bytes
    assert p.kv_cache == 8 * 2 * 24 * 2048 * 4 * 128 * 2
    assert f"| {p.kv_cache / 2**30:.2f} |" in out[2]
