"""classifier/html_report.py: the page built from a hand-made report (escaping, worst-first order, images
embedded, nothing fetched, no script), then evaluate.py's and a training run's report.html opened in
headless Chromium: no console error, no request leaving the file, every image decoded, a screenshot that
is not blank, and the numbers the browser parsed equal to metrics.json and best.pt's."""

from __future__ import annotations

import base64
import csv
import fcntl
import html
import io
import json
import os
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate
from classifier import checkpoint as ckpt
from classifier import html_report
from classifier.report import per_class_from_confusion

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)"
)
# evaluate.py's pictures of a PyTorch model, in page order (the ONNX backend writes no correct.png).
EVAL_PNGS = ["confusion_matrix.png", "errors.png", "correct.png", "reliability.png", "risk_coverage.png"]


# --- reading a page without a browser ----------------------------------------------------------------


class Tags(HTMLParser):
    """Every start tag of a page with its attributes, in document order."""

    def __init__(self, page: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))


def png(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    Image.new("RGB", size, color).save(path)
    return path.read_bytes()


def hand_made_report() -> dict:
    """metrics.json's shape for three classes; the F1 values put class 2 first, then 0, then 1."""
    names = ['<b>&"x', "coat", "shirt"]
    per_class = [
        {"class": names[0], "index": 0, "precision": 0.5, "recall": 0.25, "f1": 1 / 3, "support": 4},
        {"class": names[1], "index": 1, "precision": 0.9, "recall": 0.9, "f1": 0.9, "support": 10},
        {"class": names[2], "index": 2, "precision": 0.1, "recall": 0.2, "f1": 2 / 15, "support": 5},
    ]
    return {
        "model": "/runs/a<b>/checkpoints/best.pt",
        "backend": "pytorch",
        "weights": "ema",
        "split": "test",
        "data_root": "/data/x&y",
        "num_images": 19,
        "num_classes": 3,
        "top1": 0.631578947368421,
        "top5": None,
        "macro_f1": 0.4555555555555556,
        "weighted_f1": 0.5877192982456141,
        "balanced_accuracy": 0.45,
        "macro_auroc": 0.7123,
        "ece": 0.1234567,
        "ece_calibrated": 0.0456789,
        "ece_bins": 15,
        "loss": 1.0987654321,
        "nll": 1.0987654321,
        "nll_calibrated": 0.9,
        "temperature": 1.5,
        "temperature_fitted": True,
        "classes_without_images": [],
        "per_class": per_class,
        "most_confused": [{"true": names[0], "predicted": "shirt", "count": 3, "share_of_true": 0.75}],
        "confusion": [[1, 0, 3], [1, 9, 0], [0, 4, 1]],
    }


def test_page_escapes_orders_worst_first_and_embeds_every_image(tmp_path):
    written = {
        name: png(tmp_path / name, (40 + 10 * i, 30), (40 * i, 200, 90))
        for i, name in enumerate(
            ["confusion_matrix.png", "errors.png", "reliability.png", "risk_coverage.png"]
        )
    }
    path = html_report.write_eval_report(tmp_path, hand_made_report())
    page = path.read_text()
    tags = Tags(page).tags

    assert '<b>&"x' not in page and html.escape('<b>&"x') in page  # in the table and the confused pair
    assert "a<b>" not in page and "x&y" not in page
    rows = [int(attrs["data-class-index"]) for tag, attrs in tags if "data-class-index" in attrs]
    assert rows == [2, 0, 1]  # worst F1 first

    sources = [attrs["src"] for tag, attrs in tags if tag == "img"]
    prefix = "data:image/png;base64,"
    assert all(src.startswith(prefix) for src in sources)
    assert [base64.b64decode(src[len(prefix) :]) for src in sources] == list(written.values())  # page order
    assert f"correct.png is not in {tmp_path}" in page
    links = [value for _, attrs in tags for name, value in attrs.items() if name in ("src", "href")]
    assert not [link for link in links if link.startswith(("http://", "https://", "//"))]
    assert "<script" not in page.lower() and not [tag for tag, _ in tags if tag in ("link", "iframe")]

    exact = {
        attrs["data-metric"]: json.loads(attrs["data-value"]) for _, attrs in tags if "data-metric" in attrs
    }
    assert exact["top1"] == 0.631578947368421 and exact["top5"] is None and exact["model"].endswith("best.pt")

    # A picture missing: the page says so where it would be, and embeds the others.
    (tmp_path / "errors.png").unlink()
    page = html_report.write_eval_report(tmp_path, hand_made_report()).read_text()
    assert f"errors.png is not in {tmp_path}" in page and page.count("<img ") == 3


def test_per_class_from_confusion_matches_hand_counts():
    # Rows true, columns predicted. Class a: 4 images, 2 right, predicted 3 times. Class b: 1 image, wrong,
    # predicted once (wrongly). Class c: no images, predicted once.
    rows = per_class_from_confusion([[2, 1, 1], [1, 0, 0], [0, 0, 0]], ["a", "b", "c"])
    assert [(r["support"], r["precision"], r["recall"]) for r in rows] == [
        (4, 2 / 3, 1 / 2),
        (1, 0, 0),
        (0, 0, 0),
    ]
    assert rows[0]["f1"] == pytest.approx(4 / 7) and rows[1]["f1"] == 0 and rows[2]["f1"] == 0


# --- headless Chromium over the DevTools protocol ----------------------------------------------------


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe): it reads
    commands on fd 3 and writes replies and events on fd 4, each one JSON message ended by a NUL byte."""

    def __init__(self, profile: Path, timeout_s: float = 60):
        self.timeout_s = timeout_s
        commands_read, commands_write = os.pipe()
        replies_read, replies_write = os.pipe()
        # Chromium's ends go to fds 10 and up first, so bash's redirections onto 3 and 4 overwrite neither.
        to_chromium = fcntl.fcntl(commands_read, fcntl.F_DUPFD_CLOEXEC, 10)
        from_chromium = fcntl.fcntl(replies_write, fcntl.F_DUPFD_CLOEXEC, 10)
        for fd in (commands_read, replies_write):
            os.close(fd)
        launch = f'exec "$@" 3<&{to_chromium} 4>&{from_chromium} {to_chromium}<&- {from_chromium}>&-'
        self.process = subprocess.Popen(
            ["bash", "-c", launch, "bash", CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(to_chromium, from_chromium),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_chromium)
        os.close(from_chromium)
        self.commands, self.replies = commands_write, replies_read
        self.buffer, self.last_id, self.events = b"", 0, []

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and return its result; events that arrive meanwhile are kept in self.events."""
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.receive()
            if reply.get("id") == self.last_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, event: str) -> None:
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self.receive())

    def receive(self) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.replies], [], [], left)[0]:
                raise TimeoutError(f"chromium sent nothing for {self.timeout_s} s")
            chunk = os.read(self.replies, 1 << 20)
            if not chunk:
                raise EOFError(f"chromium closed the DevTools pipe (exit {self.process.poll()})")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.process.wait(timeout=10)
        except (AssertionError, OSError, EOFError, TimeoutError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self.commands)
            os.close(self.replies)


# Run in the page by the test, not by the page (it has no script): what the browser parsed.
READ_PAGE = """({
  metrics: Object.fromEntries(Array.from(document.querySelectorAll('[data-metric]'),
                                         e => [e.dataset.metric, [e.dataset.value, e.textContent]])),
  rows: Array.from(document.querySelectorAll('#per-class tr[data-class-index]'), row => [
    Number(row.dataset.classIndex),
    Object.fromEntries(Array.from(row.querySelectorAll('[data-field]'),
                                  cell => [cell.dataset.field, cell.dataset.value]))]),
  pairs: Array.from(document.querySelectorAll('#confused-pairs tr'), row => row.textContent),
  images: Array.from(document.images, image => [image.alt, image.naturalWidth, image.naturalHeight]),
})"""


def render(page: Path, profile: Path) -> dict:
    """Open `page` in a 1200x3000 viewport and return what went wrong (exceptions, console errors,
    error log entries), every URL requested besides data: URIs and the page itself, what READ_PAGE
    read, and the screenshot (RGB)."""
    browser = Chromium(profile)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            browser.call(f"{domain}.enable", session=session)
        viewport = {"width": 1200, "height": 3000, "deviceScaleFactor": 1, "mobile": False}
        browser.call("Emulation.setDeviceMetricsOverride", viewport, session=session)
        browser.call("Page.navigate", {"url": page.as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")  # after every image has loaded or failed
        found = browser.call("Runtime.evaluate", {"expression": READ_PAGE, "returnByValue": True}, session)
        shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
    finally:
        browser.close()
    errors, requests = [], []
    for event in browser.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            errors.append(f"exception: {details.get('exception', {}).get('description', details['text'])}")
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            errors.append(f"console.{params['type']}: {[arg.get('value') for arg in params['args']]}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(f"log: {params['entry']['text']} ({params['entry'].get('url')})")
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith("data:") and url != page.as_uri():
                requests.append(url)
    screenshot = Image.open(io.BytesIO(base64.b64decode(shot))).convert("RGB")
    return {"errors": errors, "requests": requests, **found["result"]["value"], "screenshot": screenshot}


def looks_blank(screenshot: Image.Image) -> bool:
    """A page of text, tables and plots has thousands of colours and a wide spread; an empty page or one
    with a broken-image icon has about a hundred colours, nearly all white."""
    colours = len(screenshot.getcolors(maxcolors=1 << 24))  # (count, colour) pairs
    return colours < 1000 or np.asarray(screenshot).std() < 10


def shown_number(text: str) -> float:
    """'40.0%' -> 0.4, '0.354' -> 0.354: the rounded number the page shows."""
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def rounding_of(text: str) -> float:
    """Half a unit of the last digit shown, and a hair for float error: '40.0%', '0.354' -> 0.0005."""
    decimals = len(text.rstrip("%").partition(".")[2])
    return 0.5001 * 10.0**-decimals / (100 if text.endswith("%") else 1)


@needs_chromium
def test_render_catches_a_broken_page(tmp_path):
    # The detection must be able to fail: a script error, an undecodable image, a request for an outside
    # URL (port 9 is refused by Chromium itself, so nothing leaves the machine) and a blank screenshot.
    page = tmp_path / "broken.html"
    page.write_text(
        '<!doctype html><html><body><img src="data:image/png;base64,AAAA">'
        '<img src="http://127.0.0.1:9/x.png"><script>throw new Error("boom")</script></body></html>'
    )
    seen = render(page, tmp_path / "profile")
    assert any("boom" in error for error in seen["errors"]), seen["errors"]
    assert seen["requests"] == ["http://127.0.0.1:9/x.png"]
    assert [width for _, width, _ in seen["images"]] == [0, 0]
    assert looks_blank(seen["screenshot"])


@pytest.fixture(scope="module")
def eval_dir(scored_run, tmp_path_factory) -> Path:
    """evaluate.py on the shared scored run's best.pt over its val split (60 images), small galleries."""
    out = tmp_path_factory.mktemp("html-eval") / "best-eval-val"
    evaluate.main(
        evaluate.EvalArgs(scored_run["checkpoint"], split="val", out=out, errors=8, correct=4, label_issues=4)
    )
    return out


@needs_chromium
def test_eval_report_in_chromium_shows_metrics_json(eval_dir, tmp_path):
    report = json.loads((eval_dir / "metrics.json").read_text())
    page = eval_dir / "report.html"
    pictures = sum((eval_dir / name).stat().st_size for name in EVAL_PNGS)
    assert page.stat().st_size < 4 / 3 * pictures + 30_000  # the PNGs in base64, and some text
    seen = render(page, tmp_path / "profile")
    assert seen["errors"] == [] and seen["requests"] == [] and not looks_blank(seen["screenshot"])
    sizes = []
    for name in EVAL_PNGS:
        with Image.open(eval_dir / name) as image:
            sizes.append(image.size)
    assert [(width, height) for _, width, height in seen["images"]] == sizes  # each decoded, in page order

    headline = ("top1", "top5", "macro_f1", "balanced_accuracy", "loss", "ece", "ece_calibrated")
    for key in (*headline, "num_images", "model", "split", "temperature"):
        value, text = seen["metrics"][key]
        assert json.loads(value) == report[key], key  # JSON round-trips a float exactly
    for key in headline:
        value, text = seen["metrics"][key]
        assert abs(shown_number(text) - report[key]) <= rounding_of(text), (key, text)

    with open(eval_dir / "per_class.csv", newline="") as f:
        csv_order = [int(row["index"]) for row in csv.DictReader(f)]
    assert [index for index, _ in seen["rows"]] == csv_order
    for index, fields in seen["rows"]:
        expected = report["per_class"][index]
        assert {name: json.loads(value) for name, value in fields.items()} == {
            name: expected[name] for name in ("support", "precision", "recall", "f1")
        }
    # Each row's text: true, predicted, count and share shown, one cell after the other.
    pairs = [
        f"{p['true']}{p['predicted']}{p['count']}{p['share_of_true']:.1%}" for p in report["most_confused"]
    ]
    assert seen["pairs"][1:] == pairs


@needs_chromium
def test_run_report_in_chromium_shows_the_best_epoch(scored_run, eval_dir, tmp_path):
    run_dir = scored_run["checkpoint"].parent.parent
    page = html_report.write_run_report(run_dir)
    best = ckpt.read_checkpoint(scored_run["checkpoint"])
    val, fit = best["val_metrics"], best["temperature_fit"]
    seen = render(page, tmp_path / "profile")
    assert seen["errors"] == [] and seen["requests"] == [] and not looks_blank(seen["screenshot"])
    # The confusion matrix drawn from best.pt, and no curves: scored_run turns the epoch pictures off.
    [(alt, width, height)] = seen["images"]
    assert alt == "Confusion matrix" and width > 300 and height > 300

    exact = {key: json.loads(value) for key, (value, _) in seen["metrics"].items()}
    assert {key: exact[key] for key in ("top1", "top5", "macro_f1", "balanced_accuracy", "loss")} == {
        key: val[key] for key in ("top1", "top5", "macro_f1", "balanced_accuracy", "loss")
    }
    assert (exact["ece"], exact["ece_calibrated"]) == (fit["val_ece_before"], fit["val_ece_after"])
    assert exact["epoch"] == best["best"]["epoch"] and exact["num_images"] == 60

    # evaluate.py on the same weights and split: the same confusion, so the per-class numbers computed from
    # the matrix must equal torchmetrics' in metrics.json.
    report = json.loads((eval_dir / "metrics.json").read_text())
    assert report["confusion"] == val["confusion"]
    for index, fields in seen["rows"]:
        for name in ("precision", "recall", "f1", "support"):
            assert json.loads(fields[name]) == pytest.approx(report["per_class"][index][name], abs=1e-6)
