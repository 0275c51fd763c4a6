"""Progress of long work: plain lines with elapsed time and ETA in logs, silence where disabled."""
import io

from ssl_container.utils.progress import Progress, hms


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


def test_a_log_sees_the_first_update_at_once_then_one_line_per_interval():
    """A long command used to stay silent for its first every_s (30 s): the demo's first line came at 28 s."""
    out = io.StringIO()
    with Progress(100, "features", "img", every_s=3600, stream=out) as p:
        for _ in range(50):
            p.update(2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("features: 2/100 img (2 %)")  # the first update, the summary
    assert lines[1].startswith("features: 100/100 img")


def test_the_trainer_prints_its_first_step_in_a_log(tmp_path, capsys):
    from ssl_container.trainer.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, True, total_steps=960, start_step=0, every=50, progress="lines")
    for step in range(1, 60):
        log.log(step, {"loss": 1.0})
    log.close()
    printed = [ln.split(" | ")[0] for ln in capsys.readouterr().out.splitlines()]
    assert printed == ["step 1/960", "step 50/960"]
