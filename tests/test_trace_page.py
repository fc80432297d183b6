"""The trace report's HTML page in a real headless Chromium (tests/browser.py), loaded from a file URL."""

import time

from browser import chromium, console_errors
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from dgcli.canvas_view import consume
from dgcli.trace import TraceWriter, read_trace
from dgcli.trace_metrics import metrics
from dgcli.trace_report import write_html
import dgcli


def test_replay_page_in_chromium(tiny, tmp_path):
    engine, tok = tiny
    w = TraceWriter(tmp_path / "t.jsonl.gz", tok, model="tiny", prompt="a </script> in the prompt")
    with w:
        consume(dgcli.stream_generate(engine, tok, "hello", seed=4, max_denoising_steps=4, max_new_tokens=300), [w])
    trace = read_trace(tmp_path / "t.jsonl.gz")
    nasty = "</script><!--<b>x"  # token strings are data: they can neither end the script nor become markup
    trace.header["tokens"][str(trace.steps[0]["canvas"][0])] = nasty
    page = write_html(trace, metrics(trace), tmp_path / "report.html")
    steps = len(trace.steps)
    with chromium() as driver:
        driver.get(page.as_uri())
        WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")
        canvas = driver.find_element(By.ID, "canvas")
        status = driver.find_element(By.ID, "status")
        first_html, first_status = canvas.get_attribute("innerHTML"), status.text
        assert "step 1/4" in first_status and "block 1" in first_status
        assert canvas.text.startswith(nasty) and not driver.find_elements(By.CSS_SELECTOR, "#canvas b")
        assert driver.find_elements(By.CSS_SELECTOR, "#canvas span.acc")  # accepted positions are drawn bright
        slider = driver.find_element(By.ID, "slider")
        slider.send_keys(Keys.END)  # the last step: the second block, drawn after the first's text
        assert canvas.get_attribute("innerHTML") != first_html
        assert "block 2" in status.text and driver.find_element(By.ID, "where").text == f"{steps} / {steps}"
        heat = driver.execute_script("const c = document.getElementById('heat'); return [c.width, c.height];")
        assert heat[0] >= 256 and heat[1] > 0
        slider.send_keys(Keys.HOME)
        assert canvas.get_attribute("innerHTML") == first_html
        driver.find_element(By.ID, "play").click()  # play advances the replay by itself
        WebDriverWait(driver, 10).until(lambda d: int(d.find_element(By.ID, "slider").get_attribute("value")) >= 2)
        driver.find_element(By.ID, "play").click()  # pause: it stays
        held = slider.get_attribute("value")
        time.sleep(0.6)
        assert slider.get_attribute("value") == held
        assert console_errors(driver) == []
