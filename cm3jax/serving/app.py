"""The HTTP API of a trained run (`python -m cm3jax.serve`; docs/serving.md).

  GET  /                     the demo page
  GET  /health               the run, its tasks and the queue
  POST /v1/text_to_image     JSON {captions, num_images, guidance, top_p, rerank, retrieve, seed}
  POST /v1/caption           form: image (a file)
  POST /v1/infill            form: image, caption, box "x0,y0,x1,y1" (in the model's pixels), seed
  POST /v1/tasks/{task}      form, on an instruction-tuned run: edit (image, text, s_img, s_txt),
                             vqa (image, text), image2seg (image), seg2image (image, text,
                             guidance), grounded (text, objects "NAME:X0 Y0 X1 Y1;...", guidance)

Images go out as base64 PNGs. Every request is checked before it is queued; a bad one gets 400
and {"error": one line}, a full queue 503 with Retry-After. The sampler runs on the batcher's
worker thread, never on the event loop. Text from a request only ever becomes text pieces: the
vocabulary encodes it with sentencepiece, whose pieces exclude <break>, the sentinels, the image
codes and its own control symbols (</s>), so no caption can write a control token.
"""

import asyncio
import base64
import contextlib
import dataclasses
import importlib.resources
import math
from typing import Any, Hashable, Optional, Sequence

import fastapi
import jax
import numpy as np
import pydantic
from fastapi import responses

from cm3jax import run as run_lib
from cm3jax.config import ConfigError
from cm3jax.prepare import tokenize_images
from cm3jax.sampling import sample
from cm3jax.serving import batcher as batcher_lib

SFT_TASKS = ("edit", "vqa", "image2seg", "seg2image", "grounded")
MAX_SEED = 2**31 - 1
RETRY_AFTER_S = 1


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one server accepts: `cm3jax.serve`'s flags."""
  max_batch: int = 8  # rows (images, or images to caption) in one sampler call
  max_wait_ms: float = 5.0  # how long the oldest request waits for others to join it
  max_queue: int = 64  # requests waiting; more get 503
  max_body_bytes: int = 4 << 20
  max_caption_chars: int = 400
  max_guidance: float = 20.0
  max_retrieve: int = 8
  max_rerank: int = 16


class BadRequest(ValueError):
  """A request the server refuses with 400."""


class TextToImage(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid", strict=True)
  captions: list[str]
  num_images: int = 1
  guidance: Optional[float] = None  # default: the run's measured setting
  top_p: Optional[float] = None
  rerank: Optional[int] = None
  retrieve: int = 0
  seed: int = 0


@dataclasses.dataclass
class _Draw:
  """One text->image request, checked."""
  captions: list[str]
  num_images: int
  seed: int


class Service:
  """The run, the batcher and the request checks behind the routes."""

  def __init__(self, run: run_lib.Run, limits: Limits):
    if run.vqgan is None:
      raise ConfigError(f"{run.workdir} is a text-only model: the server serves runs with images")
    self.run, self.limits = run, limits
    self.sft = run.config.get("data") == "sft"
    self.batcher = batcher_lib.Batcher(self._handle, limits.max_batch, limits.max_wait_ms / 1000,
                                       limits.max_queue)

  @property
  def resolution(self) -> int:
    return self.run.vqgan.cfg.resolution

  def tasks(self) -> list[str]:
    return ["text_to_image", "caption", "infill"] + (list(SFT_TASKS) if self.sft else [])

  def health(self) -> dict:
    return {"status": "ok", "workdir": self.run.workdir, "step": self.run.step,
            "tasks": self.tasks(), "memory": self.run.memory_bank is not None,
            "quantize": self.run.quantize,
            "resolution": self.resolution, "max_batch": self.limits.max_batch,
            "queued": self.batcher.queued}

  # Checks, on the event loop: cheap, and each a one-line BadRequest.

  def check_text(self, text: str, what: str, room: int) -> str:
    """`text`, stripped, if it is a non-empty string that leaves the model `room` tokens."""
    if not isinstance(text, str) or not text.strip():
      raise BadRequest(f"{what} is empty")
    text = text.strip()
    if len(text) > self.limits.max_caption_chars:
      raise BadRequest(f"{what} has {len(text)} characters, more than "
                       f"{self.limits.max_caption_chars}")
    tokens = len(self.run.vocab.encode_text(text))
    fits = self.run.sampler.cfg.max_seq_len - room - 3  # </s>, <break> and a sentinel around it
    if tokens > fits:
      raise BadRequest(f"{what} is {tokens} tokens; this model takes at most {fits}")
    return text

  def check_draw(self, request: TextToImage) -> tuple[Hashable, _Draw]:
    limits = self.limits
    if not request.captions:
      raise BadRequest("captions is empty: give at least one caption")
    captions = [self.check_text(c, f"caption {i}", self.run.vqgan.cfg.tokens_per_image)
                for i, c in enumerate(request.captions)]
    rows = len(captions) * request.num_images
    if not 1 <= request.num_images or rows > limits.max_batch:
      raise BadRequest(f"num_images={request.num_images} for {len(captions)} captions: at least 1 "
                       f"and at most {limits.max_batch} images in all")
    _in_range("guidance", request.guidance, 0, limits.max_guidance)
    if request.top_p is not None and not 0 < request.top_p <= 1:
      raise BadRequest(f"top_p={request.top_p} is not in (0, 1]")
    _in_range("rerank", request.rerank, 1, limits.max_rerank)
    _in_range("retrieve", request.retrieve, 0, limits.max_retrieve)
    _in_range("seed", request.seed, 0, MAX_SEED)
    if request.retrieve and self.run.memory_bank is None:
      raise BadRequest("retrieve needs a memory: start the server with --memory=BANK")
    group = ("text_to_image", request.guidance, request.top_p, request.rerank, request.retrieve)
    return group, _Draw(captions, request.num_images, request.seed)

  def check_image(self, data: bytes, what: str = "image") -> np.ndarray:
    if not data:
      raise BadRequest(f"{what} is missing or empty")
    try:
      return tokenize_images.decode_image(data, self.resolution)
    except Exception:  # PIL raises many types (some of them OSError) for what is not an image
      raise BadRequest(f"{what} is not an image PIL can decode") from None

  def check_box(self, box: str) -> list[int]:
    values = box.replace(",", " ").split()
    if len(values) != 4 or not all(v.isdigit() for v in values):
      raise BadRequest(f"box {box!r} is not x0,y0,x1,y1 in whole pixels")
    x0, y0, x1, y1 = map(int, values)
    if not (x0 < x1 <= self.resolution and y0 < y1 <= self.resolution):
      raise BadRequest(f"box {box!r} is not x0 < x1 <= {self.resolution}, y0 < y1 <= "
                       f"{self.resolution}")
    return [x0, y0, x1, y1]

  # The worker thread's side.

  def _handle(self, group: Hashable, payloads: Sequence[Any]) -> list[dict]:
    if group[0] == "text_to_image":
      return self._draw(group, payloads)
    if group[0] == "caption":
      images = np.stack(payloads)
      captions = self.run.caption(np.concatenate([images, images[-1:].repeat(
          self._filled(len(images)) - len(images), 0)]))
      return [{"caption": c} for c in captions[:len(payloads)]]
    return [payloads[0]()]  # the other tasks come one at a time

  def _filled(self, rows: int) -> int:
    """The rows of the batch that serves `rows`: a power of two (or max_batch), one of the shapes
    that start-up compiled."""
    return min(2**math.ceil(math.log2(rows)), self.limits.max_batch)

  def _draw(self, group, draws: Sequence[_Draw]) -> list[dict]:
    _, guidance, top_p, rerank, retrieve = group
    rows = [c for d in draws for c in d.captions for _ in range(d.num_images)]
    keys = np.concatenate([jax.random.split(jax.random.PRNGKey(d.seed),
                                            len(d.captions) * d.num_images) for d in draws])
    pad = self._filled(len(rows)) - len(rows)
    images = self.run.draw(rows + rows[-1:] * pad, np.concatenate([keys, keys[-1:].repeat(pad, 0)]),
                           guidance, top_p, rerank, retrieve)
    documents = None
    if retrieve:
      captions = [c for d in draws for c in d.captions]
      found_captions, found_images = self.run.retrieve(captions, retrieve)
      documents = iter(zip(found_captions, found_images))
    out, start = [], 0
    for d in draws:
      result = {"images": []}
      for _ in d.captions:
        result["images"].append([_png(x) for x in images[start:start + d.num_images]])
        start += d.num_images
      if documents is not None:
        result["retrieved"] = [[{"caption": c, "image": _png(x)} for c, x in zip(*next(documents))]
                               for _ in d.captions]
      out.append(result)
    return out

  def warm_up(self) -> list[str]:
    """Draws and captions once at each batch size the server makes, so that every compiled shape
    exists before the first request; returns what it compiled."""
    sizes = sorted({self._filled(n) for n in range(1, self.limits.max_batch + 1)})
    blank = np.zeros((self.resolution, self.resolution, 3), np.uint8)
    for size in sizes:
      self.run.draw(["warm up"] * size, jax.random.split(jax.random.PRNGKey(0), size))
      self.run.caption(np.stack([blank] * size))
    return [f"text_to_image and caption of {size}" for size in sizes]


def _in_range(name: str, value, low, high):
  if value is not None and not low <= value <= high:
    raise BadRequest(f"{name}={value} is not in [{low}, {high}]")


def _png(image: np.ndarray) -> str:
  return base64.b64encode(sample.png_bytes(image)).decode("ascii")


def _error(status: int, message: str, headers: Optional[dict] = None) -> responses.JSONResponse:
  return responses.JSONResponse({"error": message.splitlines()[0] if message else "error"},
                                status, headers)


class BodyLimit:
  """ASGI middleware: reads a request's whole body before the app sees it, and answers 413 once
  it passes `max_bytes`, whether its Content-Length said so or its chunks add up to it."""

  def __init__(self, app, max_bytes: int):
    self.app, self.max_bytes = app, max_bytes

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    declared = dict(scope["headers"]).get(b"content-length", b"")
    too_large = _error(413, f"the request body exceeds {self.max_bytes} bytes")
    if declared.isdigit() and int(declared) > self.max_bytes:
      return await too_large(scope, receive, send)
    messages, size = [], 0
    while True:
      message = await receive()
      messages.append(message)
      size += len(message.get("body", b""))
      if size > self.max_bytes:
        return await too_large(scope, receive, send)
      if message["type"] != "http.request" or not message.get("more_body"):
        break

    async def replay():
      return messages.pop(0) if messages else await receive()
    await self.app(scope, replay, send)


def make_app(service: Service) -> BodyLimit:
  """The ASGI app: the routes behind the body limit. Shutting down drains the batcher."""

  @contextlib.asynccontextmanager
  async def lifespan(_):
    yield
    await asyncio.to_thread(service.batcher.close)

  app = fastapi.FastAPI(title="cm3jax", docs_url=None, redoc_url=None, lifespan=lifespan)
  page = importlib.resources.files("cm3jax.serving").joinpath("demo.html").read_text()

  @app.exception_handler(BadRequest)
  @app.exception_handler(run_lib.RequestError)
  @app.exception_handler(ConfigError)
  async def bad_request(_, e):
    return _error(400, str(e))

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def invalid(_, e):
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    return _error(400, f"{where}: {first['msg']}" if where else first["msg"])

  @app.exception_handler(batcher_lib.Overloaded)
  async def overloaded(_, e):
    return _error(503, f"busy: {e}; retry later", {"Retry-After": str(RETRY_AFTER_S)})

  @app.exception_handler(batcher_lib.Closed)
  async def closed(_, e):
    return _error(503, str(e), {"Retry-After": str(RETRY_AFTER_S)})

  @app.exception_handler(fastapi.HTTPException)
  async def http_error(_, e):
    return _error(e.status_code, str(e.detail))

  @app.get("/", response_class=responses.HTMLResponse)
  async def demo():
    return page

  @app.get("/health")
  async def health():
    return service.health()

  @app.post("/v1/text_to_image")
  async def text_to_image(request: TextToImage):
    group, draw = service.check_draw(request)
    return await service.batcher.submit(group, len(draw.captions) * draw.num_images, draw)

  @app.post("/v1/caption")
  async def caption(image: fastapi.UploadFile = fastapi.File(None)):
    pixels = service.check_image(await _read(image))
    return await service.batcher.submit(("caption",), 1, pixels)

  @app.post("/v1/infill")
  async def infill(image: fastapi.UploadFile = fastapi.File(None), caption: str = fastapi.Form(""),
                   box: str = fastapi.Form(""), seed: int = fastapi.Form(0)):
    pixels = service.check_image(await _read(image))
    caption = service.check_text(caption, "caption", service.run.vqgan.cfg.tokens_per_image * 2)
    box = service.check_box(box)
    _in_range("seed", seed, 0, MAX_SEED)
    call = lambda: {"image": _png(service.run.infill(pixels, box, caption, seed))}
    return await service.batcher.submit(("infill", object()), 1, call)

  @app.post("/v1/tasks/{task}")
  async def task(task: str, image: fastapi.UploadFile = fastapi.File(None),
                 text: str = fastapi.Form(""), objects: str = fastapi.Form(""),
                 guidance: Optional[float] = fastapi.Form(None),
                 s_img: Optional[float] = fastapi.Form(None),
                 s_txt: Optional[float] = fastapi.Form(None), seed: int = fastapi.Form(0)):
    if task not in SFT_TASKS:
      raise BadRequest(f"task {task!r} is not one of {list(SFT_TASKS)}")
    if not service.sft:
      raise BadRequest(f"task {task!r} needs an instruction-tuned run; this one is not")
    for name, value in (("guidance", guidance), ("s_img", s_img), ("s_txt", s_txt)):
      _in_range(name, value, 0, service.limits.max_guidance)
    _in_range("seed", seed, 0, MAX_SEED)
    room = service.run.vqgan.cfg.tokens_per_image * 2
    run = service.run
    if task == "grounded":
      caption = service.check_text(text, "text", room)
      try:
        boxes = sample.parse_objects(objects)
      except ConfigError as e:
        raise BadRequest(str(e).replace("--objects", "objects")) from None
      call = lambda: {"image": _png(run.grounded([caption], [boxes], guidance, seed)[0])}
    else:
      pixels = service.check_image(await _read(image))
      if task == "image2seg":
        call = lambda: {"image": _png(run.image2seg(pixels, seed)[0])}
      else:
        said = service.check_text(text, "text", room)
        call = {"edit": lambda: {"image": _png(run.edit(pixels, [said], s_img, s_txt, seed)[0])},
                "vqa": lambda: {"answer": run.vqa(pixels, [said], seed)[0]},
                "seg2image": lambda: {"image": _png(run.seg2image(pixels, [said], guidance,
                                                                  seed)[0])}}[task]
    return await service.batcher.submit((task, object()), 1, call)

  return BodyLimit(app, service.limits.max_body_bytes)


async def _read(upload: Optional[fastapi.UploadFile]) -> bytes:
  return b"" if upload is None else await upload.read()
