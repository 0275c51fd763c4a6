"""Progress of long work: plain lines with elapsed time and ETA in logs, silence where disabled."""
import io

from ssl_container.progress import Progress, hms


def test_hms():
    assert (hms(0), hms(59.6), hms(61), hms(3723), hms(float("nan"))) == ("0:00", "1:00", "1:01", "1:02:03", "?")


def test_plain_lines_count_and_estimate():
    out = io.StringIO()  # not a terminal: lines, not a bar
    with Progress(10, "features", "img", every_s=0, stream=out) as p:
        for _ in range(4):
            p.update(2)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("features: 2/10 img (20 %) | elapsed ") and "| eta " in lines[0]
    assert lines[3].startswith("features: 8/10 img (80 %)")
    assert lines[-1].startswith("features: 8/10 img") and len(lines) == 5  # the closing summary line
    assert "?" not in lines[0]  # an ETA once one item is done


def test_disabled_and_unknown_total():
    out = io.StringIO()
    with Progress(10, "x", enabled=False, every_s=0, stream=out) as p:
        p.update(5)
    assert out.getvalue() == ""
    with Progress(None, "shards", "shard", every_s=0, stream=out) as p:
        p.update()
    assert out.getvalue().splitlines()[0].startswith("shards: 1 shard | elapsed ")
