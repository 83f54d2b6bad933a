"""The soak test (tests/soak.py) cut short for `make test`: 2,000 mixed
requests from 16 workers, the first 500 a warm-up, with the same checks as
the full 20,000-request `make soak`.

One threshold differs. 5 % of the server's ~170 MB RSS would let a short
run hide a leak of ~6 KiB per request, so the RSS growth after the warm-up
is also capped at 4 MiB (~2.7 KiB per soak request). Idle-to-idle growth
measured on a 2-core machine was 60-300 KiB for this run and 108 KiB over
18,000 requests of the full one (malloc arena and page-granularity noise),
so the cap is more than ten times the noise."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import soak  # noqa: E402


def test_soak_short(moed_bin, tmp_path):
    o = soak.options(["--requests", "2000", "--warmup", "500", "--workers", "16", "--rss-growth-kib", "4096"])
    r = soak.run(moed_bin, tmp_path, o)
    print(r.table())
    assert not r.failures, r.table() + "\n\nFAILED:\n" + "\n".join(r.failures)
