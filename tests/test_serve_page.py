"""dg serve's page (GET /) in a real headless Chromium: type a prompt, watch the canvas change,
see the answer, with no console errors."""

from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

import dgcli
from browser import chromium, console_errors
from serve_helpers import Served


def test_the_page_chats_and_draws_the_canvas(tiny):
    with Served(*tiny) as s, chromium() as driver:
        driver.get(s.url + "/")
        assert driver.find_element(By.ID, "model").text == "tiny"
        for field, value in (("max_tokens", "32"), ("steps", "16"), ("seed", "3")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "prompt").send_keys("hello there", Keys.ENTER)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: not d.find_element(By.ID, "send").get_attribute("disabled")
                   and d.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
        answer = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
        want = dgcli.generate(*tiny, "hello there", seed=3, max_new_tokens=32, max_denoising_steps=16)
        assert answer == want.strip() and answer
        canvas = driver.find_element(By.ID, "canvas")
        assert int(canvas.get_attribute("data-frames")) >= 2 and int(canvas.get_attribute("data-changes")) >= 2
        assert canvas.find_elements(By.CSS_SELECTOR, "span.a")  # accepted positions drawn bright
        assert "tokens" in driver.find_element(By.ID, "status").text  # the usage line came
        assert driver.find_element(By.CSS_SELECTOR, ".msg.user").text == "hello there"
        assert console_errors(driver) == []
