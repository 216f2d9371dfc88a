"""The server (cm3jax/serving/, cm3jax/serve.py) on an untrained run: what each endpoint gives
equals what the library gives for the same request, batched or not; bad input gets 400 and one
line, a full queue 503, an oversized body 413; the command binds 127.0.0.1 and drains on
SIGTERM; and the demo page works in a real browser (Debian's chromium, headless, driven by
selenium through Debian's chromedriver)."""

import asyncio
import base64
import io
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import httpx
import numpy as np
import pytest
from PIL import Image

import cm3jax
from cm3jax.core.vocab import EOS, SPECIALS
from cm3jax.serving import app as app_lib
from cm3jax.serving import batcher as batcher_lib
from tests import helpers

CAPTION = "a red circle above a blue square"


@pytest.fixture(scope="module")
def run(untrained_workdir):
  return cm3jax.load(untrained_workdir)


def serve(run, **limits) -> app_lib.Service:
  return app_lib.Service(run, app_lib.Limits(**limits))


def talk(service, conversation):
  """What `await conversation(client)` returns, the client talking to `service`'s app."""
  async def go():
    transport = httpx.ASGITransport(app_lib.make_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
      return await conversation(client)
  return asyncio.run(go())


def post_all(service, path, requests):
  """The responses to `requests` (JSON bodies) sent to `path` at once."""
  return talk(service, lambda client: asyncio.gather(*(client.post(path, json=r)
                                                         for r in requests)))


def pixels(b64: str) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def png(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, format="PNG")
  return out.getvalue()


def test_requests_sent_together_are_drawn_in_one_batch_as_each_alone(run):
  service = serve(run, max_batch=8, max_wait_ms=500)
  requests = [{"captions": [CAPTION], "num_images": 2, "seed": 1},
              {"captions": ["a small green triangle", CAPTION], "num_images": 1, "seed": 2},
              {"captions": ["a blue square on the left"], "num_images": 3, "seed": 3}]
  responses = post_all(service, "/v1/text_to_image", requests)
  assert [r.status_code for r in responses] == [200] * 3, [r.text for r in responses]
  assert service.batcher.batches == {3: 1}  # one sampler call served all three
  for request, response in zip(requests, responses):
    got = response.json()["images"]
    want = run.text_to_image(request["captions"], request["num_images"], seed=request["seed"])
    assert len(got) == len(request["captions"])
    for images, wanted in zip(got, want, strict=True):
      np.testing.assert_array_equal(np.stack([pixels(x) for x in images]), wanted)


def test_only_requests_that_share_a_setting_share_a_batch(run):
  service = serve(run, max_batch=8, max_wait_ms=300)
  requests = [{"captions": [CAPTION], "seed": 1}, {"captions": [CAPTION], "guidance": 2.0},
              {"captions": [CAPTION], "seed": 2}, {"captions": [CAPTION], "top_p": 0.5}]
  responses = post_all(service, "/v1/text_to_image", requests)
  assert [r.status_code for r in responses] == [200] * 4
  assert service.batcher.batches == {2: 1, 1: 2}
  want = run.text_to_image([CAPTION], 1, guidance=2.0)[0, 0]
  np.testing.assert_array_equal(pixels(responses[1].json()["images"][0][0]), want)


def test_images_are_captioned_in_one_batch(run):
  service = serve(run, max_batch=4, max_wait_ms=500)
  images = run.text_to_image([CAPTION, "a small green triangle"], 1, seed=5)[:, 0]

  responses = talk(service, lambda client: asyncio.gather(
      *(client.post("/v1/caption", files={"image": png(x)}) for x in images)))
  assert [r.status_code for r in responses] == [200, 200]
  assert [r.json()["caption"] for r in responses] == run.caption(images)
  assert service.batcher.batches == {2: 1}


def test_start_up_compiles_every_shape_a_request_meets(run):
  service = serve(run, max_batch=4, max_wait_ms=300)
  assert service.warm_up() == [f"text_to_image and caption of {n}" for n in (1, 2, 4)]
  compiled = run.sampler._generate._cache_size()
  requests = [{"captions": [CAPTION], "num_images": n, "seed": n} for n in (1, 2, 3)]
  for batch in ([requests[0]], requests[:2], [requests[2]]):  # 1, 3 and 3 rows
    assert {r.status_code for r in post_all(service, "/v1/text_to_image", batch)} == {200}
  image = png(np.zeros((32, 32, 3), np.uint8))
  captioned = talk(service, lambda c: asyncio.gather(
      *(c.post("/v1/caption", files={"image": image}) for _ in range(3))))
  assert {r.status_code for r in captioned} == {200}
  assert run.sampler._generate._cache_size() == compiled


def test_health_and_the_demo_page(run, untrained_workdir):
  service = serve(run)
  health = talk(service, lambda c: c.get("/health"))
  assert health.status_code == 200
  assert health.json() | {"queued": 0} == {
      "status": "ok", "workdir": untrained_workdir, "step": run.step, "memory": False, "quantize": "none",
      "tasks": ["text_to_image", "caption", "infill"], "resolution": 32, "max_batch": 8,
      "queued": 0}
  page = talk(service, lambda c: c.get("/"))
  assert page.status_code == 200 and 'id="draw"' in page.text and "/v1/text_to_image" in page.text


def test_infill_redraws_the_box(run):
  service = serve(run)
  image = run.text_to_image([CAPTION], 1, seed=4)[0, 0]
  response = talk(service, lambda c: c.post(
      "/v1/infill", files={"image": png(image)},
      data={"caption": CAPTION, "box": "0,0,16,8", "seed": "3"}))
  assert response.status_code == 200, response.text
  np.testing.assert_array_equal(pixels(response.json()["image"]),
                                run.infill(image, [0, 0, 16, 8], CAPTION, seed=3))


def test_a_caption_never_becomes_a_control_token(run, monkeypatch):
  seen = []
  generate = run.sampler.generate
  monkeypatch.setattr(run.sampler, "generate", lambda requests, *a: seen.extend(requests)
                      or generate(requests, *a))
  service = serve(run)
  tricky = "a </s> red <break> circle <s0> <sentinel:0> <img src=x> <pad> <eoss>"
  response = post_all(service, "/v1/text_to_image", [{"captions": [tricky]}])[0]
  assert response.status_code == 200, response.text
  prompt = seen[0].prompt
  assert prompt[0] == EOS and prompt[-1] == run.vocab.break_id
  caption_ids = prompt[1:-1]
  assert np.array_equal(caption_ids, run.vocab.encode_text(tricky))
  assert run.vocab.is_text(caption_ids).all() and (caption_ids >= len(SPECIALS)).all()


@pytest.mark.parametrize("body, message", [
    ({"captions": []}, "captions is empty"),
    ({"captions": ["  "]}, "caption 0 is empty"),
    ({"captions": ["ab" * 300]}, "caption 0 has 600 characters"),
    ({"captions": ["q z " * 70]}, "tokens; this model takes at most 109"),
    ({"captions": [CAPTION], "num_images": 0}, "at least 1 and at most 8 images"),
    ({"captions": [CAPTION] * 3, "num_images": 3}, "at least 1 and at most 8 images"),
    ({"captions": [CAPTION], "guidance": -1.0}, "guidance=-1.0 is not in [0, 20.0]"),
    ({"captions": [CAPTION], "top_p": 0.0}, "top_p=0.0 is not in (0, 1]"),
    ({"captions": [CAPTION], "rerank": 99}, "rerank=99 is not in [1, 16]"),
    ({"captions": [CAPTION], "seed": -1}, "seed=-1 is not in"),
    ({"captions": [CAPTION], "retrieve": 2}, "retrieve needs a memory"),
    ({"captions": CAPTION}, "captions: Input should be a valid list"),
    ({"captions": [CAPTION], "num_images": "2"}, "num_images: Input should be a valid integer"),
    ({"captions": [CAPTION], "steps": 5}, "steps: Extra inputs are not permitted"),
])
def test_a_bad_draw_request_gets_400_and_one_line(run, body, message):
  service = serve(run)
  response = post_all(service, "/v1/text_to_image", [body])[0]
  assert response.status_code == 400, response.text
  error = response.json()["error"]
  assert message in error and "\n" not in error, error
  assert service.batcher.batches == {}  # refused before it was queued


def test_bad_uploads_forms_and_tasks_get_400(run):
  service = serve(run)
  image = png(np.zeros((32, 32, 3), np.uint8))
  cases = [
      (("/v1/caption",), {"files": {"image": b"not an image"}}, "image is not an image"),
      (("/v1/caption",), {}, "image is missing or empty"),
      (("/v1/infill",), {"files": {"image": image}, "data": {"caption": CAPTION, "box": "1,2,3"}},
       "is not x0,y0,x1,y1"),
      (("/v1/infill",), {"files": {"image": image}, "data": {"caption": CAPTION,
                                                             "box": "8,0,4,8"}}, "x0 < x1 <= 32"),
      (("/v1/infill",), {"files": {"image": image}, "data": {"box": "0,0,8,8"}},
       "caption is empty"),
      (("/v1/tasks/paint",), {"files": {"image": image}}, "task 'paint' is not one of"),
      (("/v1/tasks/edit",), {"files": {"image": image}, "data": {"text": "make it blue"}},
       "needs an instruction-tuned run"),
      (("/v1/infill",), {"files": {"image": image}, "data": {"caption": CAPTION, "box": "0,0,8,8",
                                                             "seed": "x"}},
       "seed: Input should be a valid integer"),
  ]

  async def send(client):
    return [await client.post(*where, **how) for where, how, _ in cases]
  for response, (_, _, message) in zip(talk(service, send), cases):
    assert response.status_code == 400, response.text
    assert message in response.json()["error"], response.json()


def test_a_full_queue_answers_503_with_retry_after_and_recovers(run, monkeypatch):
  service = serve(run, max_batch=1, max_queue=2, max_wait_ms=0)
  started, release = threading.Event(), threading.Event()
  handle = service._handle
  monkeypatch.setattr(service.batcher, "handle",
                      lambda *a: (started.set(), release.wait(30)) and handle(*a))

  async def burst(client):
    send = lambda i: asyncio.create_task(client.post("/v1/text_to_image",
                                                     json={"captions": [CAPTION], "seed": i}))
    sent = [send(0)]
    assert await asyncio.to_thread(started.wait, 30)  # the worker holds the first
    sent += [send(i) for i in range(1, 12)]
    await asyncio.sleep(1.0)
    release.set()
    return await asyncio.gather(*sent)
  responses = talk(service, burst)
  codes = [r.status_code for r in responses]
  # one in the worker's hands, two queued: the other nine are refused at once
  assert codes[0] == 200 and sorted(codes) == [200] * 3 + [503] * 9, codes
  refused = next(r for r in responses if r.status_code == 503)
  assert refused.headers["Retry-After"] == "1" and "busy" in refused.json()["error"]
  again = post_all(service, "/v1/text_to_image", [{"captions": [CAPTION]}])[0]
  assert again.status_code == 200


def test_a_body_over_the_limit_gets_413(run):
  service = serve(run, max_body_bytes=1000)
  big = {"captions": ["x" * 2000]}
  response = post_all(service, "/v1/text_to_image", [big])[0]
  assert response.status_code == 413 and "exceeds 1000 bytes" in response.json()["error"]

  async def chunks():  # no Content-Length: counted as it arrives
    for _ in range(4):
      yield b"x" * 400
  streamed = talk(service, lambda c: c.post("/v1/caption", content=chunks(), headers={
      "Content-Type": "multipart/form-data; boundary=x"}))
  assert streamed.status_code == 413, streamed.text
  assert service.batcher.batches == {}


# The batcher alone.

def test_the_batcher_groups_by_key_up_to_max_batch_and_keeps_order():
  calls = []
  batcher = batcher_lib.Batcher(lambda group, items: calls.append((group, list(items))) or
                                [f"{group}:{i}" for i in items], max_batch=3, max_wait_s=0.3,
                                max_queue=10)
  futures = [batcher.put(g, rows, i) for i, (g, rows) in enumerate(
      [("a", 1), ("b", 1), ("a", 2), ("a", 1), ("b", 2)])]
  assert [f.result(10) for f in futures] == ["a:0", "b:1", "a:2", "a:3", "b:4"]
  assert calls == [("a", [0, 2]), ("b", [1, 4]), ("a", [3])]
  batcher.close()


def test_the_batcher_waits_for_company_only_while_jobs_keep_company():
  held, release = threading.Event(), threading.Event()

  def handle(group, items):
    if items == ["hold"]:
      held.set()
      release.wait(10)
    return list(items)
  batcher = batcher_lib.Batcher(handle, max_batch=8, max_wait_s=0.3, max_queue=10)
  start = time.monotonic()
  assert batcher.put("a", 1, "x").result(10) == "x"  # waited for company, found none
  assert 0.25 < time.monotonic() - start < 2.0
  hold = batcher.put("a", 1, "hold")  # alone last time: served at once
  assert held.wait(0.2)
  pair = [batcher.put("a", 1, i) for i in "pq"]  # queued behind it: one batch
  release.set()
  assert hold.result(10) == "hold" and [f.result(10) for f in pair] == ["p", "q"]
  start = time.monotonic()
  assert batcher.put("a", 1, "z").result(10) == "z"  # company last time: waits again
  assert 0.25 < time.monotonic() - start < 2.0
  assert batcher.batches == {1: 3, 2: 1}
  batcher.close()


def test_one_bad_payload_fails_alone():
  def handle(group, items):
    if "bad" in items:
      raise ValueError("bad item")
    return [i.upper() for i in items]
  batcher = batcher_lib.Batcher(handle, max_batch=4, max_wait_s=0.3, max_queue=10)
  futures = [batcher.put("a", 1, i) for i in ("x", "bad", "y")]
  assert futures[0].result(10) == "X" and futures[2].result(10) == "Y"
  with pytest.raises(ValueError, match="bad item"):
    futures[1].result(10)
  batcher.close()


def test_closing_drains_the_queue_then_refuses():
  batcher = batcher_lib.Batcher(lambda g, items: (time.sleep(0.1), list(items))[1], max_batch=1,
                                max_wait_s=0, max_queue=10)
  futures = [batcher.put("a", 1, i) for i in range(5)]
  batcher.close()
  assert [f.result(0) for f in futures] == list(range(5))
  with pytest.raises(batcher_lib.Closed):
    batcher.put("a", 1, 0)
  with pytest.raises(ValueError, match="does not fit a batch of 1"):
    batcher_lib.Batcher(lambda g, i: i, 1, 0, 1).put("a", 2, 0)


# The command.

def start_server(workdir, *flags):
  """The command, listening; it compiles on the first requests (start-up's compiling is
  test_start_up_compiles_every_shape_a_request_meets's)."""
  server = subprocess.Popen(
      [sys.executable, "-m", "cm3jax.serve", f"--workdir={workdir}", "--port=0", "--nowarm_up",
       *flags],
      cwd=helpers.REPO, env=helpers.command_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  for line in server.stdout:
    if line.startswith("serving "):
      return server, line.split(" on ")[1].strip()
  raise AssertionError(server.stderr.read()[-3000:])


@pytest.mark.slow
def test_the_command_binds_localhost_and_drains_on_sigterm(untrained_workdir):
  # The request waits 3 s in the queue for company: SIGTERM comes while it is in flight.
  server, address = start_server(untrained_workdir, "--max_batch=4", "--max_wait_ms=3000")
  try:
    assert address.startswith("http://127.0.0.1:")
    request = urllib.request.Request(f"{address}/v1/text_to_image", method="POST",
                                     data=json.dumps({"captions": [CAPTION], "num_images": 2,
                                                      "seed": 7}).encode(),
                                     headers={"Content-Type": "application/json"})
    answers = []
    sender = threading.Thread(target=lambda: answers.append(
        json.load(urllib.request.urlopen(request, timeout=120))))
    sender.start()
    time.sleep(1.0)
    server.send_signal(signal.SIGTERM)
    sender.join(120)
    # Once drained, uvicorn raises the signal again: the process ends as SIGTERM ends it.
    assert server.wait(60) == -signal.SIGTERM, server.stderr.read()[-3000:]
  finally:
    server.kill()
  assert len(answers) == 1 and len(answers[0]["images"][0]) == 2
  images = cm3jax.load(untrained_workdir).text_to_image([CAPTION], 2, seed=7)[0]
  np.testing.assert_array_equal(np.stack([pixels(x) for x in answers[0]["images"][0]]), images)


@pytest.mark.slow
def test_the_command_refuses_a_missing_run_in_one_line(tmp_path):
  result = helpers.run_module("cm3jax.serve", f"--workdir={tmp_path}", "--port=0")
  helpers.assert_one_line_error(result, "cm3jax.serve", "checkpoint")


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # .ci/run installs them


@pytest.mark.slow
def test_the_demo_page_draws_and_captions_in_a_browser(untrained_workdir, tmp_path):
  from selenium import webdriver
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--no-first-run",
               "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
               "--window-size=1000,1000"):
    options.add_argument(flag)
  server, address = start_server(untrained_workdir, "--max_batch=4")
  browser = webdriver.Chrome(options=options,
                             service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
  wait = WebDriverWait(browser, 120)
  try:
    browser.get(address)
    wait.until(lambda b: "at step" in b.find_element(By.ID, "about").text)
    caption = browser.find_element(By.ID, "caption")
    caption.clear()
    caption.send_keys(CAPTION)
    count = browser.find_element(By.ID, "num-images")
    count.clear()
    count.send_keys("3")
    browser.find_element(By.ID, "draw").click()
    drawn = "return [...document.querySelectorAll('img.drawn')].map(i => i.complete && i.naturalWidth)"
    wait.until(lambda b: b.execute_script(drawn) == [32, 32, 32])
    assert browser.find_element(By.ID, "status").text == f'3 images of "{CAPTION}"'
    browser.save_screenshot(str(tmp_path / "demo.png"))
    assert Image.open(tmp_path / "demo.png").size[0] > 0

    canvas = browser.find_element(By.ID, "canvas")
    ActionChains(browser).move_to_element(canvas).click_and_hold().move_by_offset(30, 20) \
        .release().perform()
    browser.find_element(By.ID, "describe").click()
    wait.until(lambda b: b.find_element(By.ID, "status").text == "captioned")
    assert browser.find_element(By.ID, "caption-out").text.strip()

    caption.clear()
    browser.find_element(By.ID, "draw").click()
    wait.until(lambda b: "caption 0 is empty" in b.find_element(By.ID, "status").text)
    assert browser.execute_script(drawn) == []
  finally:
    browser.quit()
    server.kill()
