"""Remote image URLs (--allow-remote-images): the download connects to the address that was checked, one deadline
bounds all of it, and it runs on threads of the HTTP process, so that a slow image server holds no input worker."""
from __future__ import annotations

import base64
import http.server
import io
import shutil
import socket
import ssl
import subprocess
import threading

import PIL.Image
import pytest
import torch

from mllama.server.prompts import ImageOptions, RequestError, fetch_remote

from test_server import MODEL

PARAM = "messages[0].content[0].image_url.url"
GUARD = 60  # seconds: only so that a failing test ends; a passing one takes well under one


def _png() -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (32, 24), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def _serve(respond) -> http.server.ThreadingHTTPServer:
    """A server on 127.0.0.1 that answers every GET with respond(handler), each on its own thread."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            respond(self)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _send(handler, body: bytes) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _accepted(listener: socket.socket) -> list:
    """The connections waiting on a listener that never accepts: the kernel completes a TCP handshake before the
    client's connect() returns, so any connection made is here by then."""
    peers = []
    listener.setblocking(False)
    while True:
        try:
            conn, peer = listener.accept()
        except BlockingIOError:
            return peers
        conn.close()
        peers.append(peer)


def test_the_download_connects_to_the_checked_address(monkeypatch):
    """DNS rebinding: the first answer is public and passes the check, every later one is 127.0.0.1. The
    download must use the first answer, not resolve again."""
    public, image = "93.184.216.34", _png()
    internal = socket.create_server(("127.0.0.1", 0))  # what a second answer would reach
    port = internal.getsockname()[1]
    hosts = []
    site = _serve(lambda handler: (hosts.append(handler.headers["Host"]), _send(handler, image)))
    answers = iter([public] + ["127.0.0.1"] * 10)

    def resolve(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (next(answers), port or 0))]

    real_connect, connected = socket.socket.connect, []

    def connect(sock, address):
        connected.append(address)
        # the public host stands on loopback here: its connections go to `site`
        return real_connect(sock, site.server_address if address[0] == public else address)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(socket.socket, "connect", connect)
    try:
        try:
            result = fetch_remote(f"http://images.example:{port}/cat.png", PARAM,
                                  ImageOptions(allow_remote=True, timeout=5))
        except RequestError as e:
            result = e
        reached = _accepted(internal)
    finally:
        monkeypatch.undo()
        internal.close()
        site.shutdown()
    assert reached == [], "the download connected to the address of a second DNS answer"
    assert connected == [(public, port)]
    assert result == image
    assert hosts == [f"images.example:{port}"]  # the URL's host, not the address, in the Host header


def test_one_deadline_bounds_the_whole_download():
    """A server that sends its headers, then one byte every 0.3 s: no single read waits long, but the download as a
    whole must stop at ImageOptions.timeout."""
    stop = threading.Event()

    def trickle(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "1000000")
        handler.end_headers()
        try:
            while not stop.wait(0.3):
                handler.wfile.write(b"x")
        except OSError:  # the client gave up
            pass

    site = _serve(trickle)
    outcome = []

    def fetch():
        try:
            outcome.append(fetch_remote(f"http://127.0.0.1:{site.server_address[1]}/slow.png", PARAM,
                                        ImageOptions(allow_remote=True, allow_private_hosts=True, timeout=1.0)))
        except RequestError as e:
            outcome.append(e)

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(GUARD)
    running = thread.is_alive()  # before the server stops: a stopped trickle would end the download too
    stop.set()
    site.shutdown()
    assert not running, f"the download was still running after {GUARD} s"
    (error,) = outcome
    assert isinstance(error, RequestError) and error.param == PARAM and error.status == 400
    assert "took longer than 1 s" in error.message, error.message



@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_verifies_the_url_host_name_on_the_checked_address(tmp_path, monkeypatch):
    """https: TCP to the resolved address, TLS with the URL's name for SNI and the certificate (a certificate for
    the name, not for 127.0.0.1: checking against the address would fail)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=images.example",
                    "-addext", "subjectAltName=DNS:images.example"], check=True, capture_output=True)
    image, names = _png(), []
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    server_tls.sni_callback = lambda sock, name, context: names.append(name)
    site = _serve(lambda handler: _send(handler, image))
    site.socket = server_tls.wrap_socket(site.socket, server_side=True)
    client_tls = ssl.create_default_context(cafile=str(cert))
    monkeypatch.setattr("mllama.server.prompts._tls_context", lambda: client_tls)
    real_resolve = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: real_resolve(
        "127.0.0.1" if host == "images.example" else host, *args, **kwargs))
    try:
        data = fetch_remote(f"https://images.example:{site.server_address[1]}/cat.png", PARAM,
                            ImageOptions(allow_remote=True, allow_private_hosts=True, timeout=10))
    finally:
        site.shutdown()
    assert data == image and names == ["images.example"]

@pytest.fixture(scope="module")
def one_worker_app(tiny_checkpoint):
    """create_app over a BatchEngine of this process, with ONE input worker process and remote images allowed
    (private hosts too: the image servers here are on 127.0.0.1)."""
    from fastapi.testclient import TestClient

    from mllama.engine.batch import BatchEngine
    from mllama.modeling.mllama import MllamaForConditionalGeneration
    from mllama.processing.processor import AutoProcessor
    from mllama.server import ServerOptions, create_app

    model = MllamaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32,
                                                           device_map="cpu").eval()
    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint))
    engine = BatchEngine(model, processor.tokenizer, max_batch=4, max_model_len=512).start()
    # a long timeout: the held fetch below must still be running when the other request is answered
    images = ImageOptions(allow_remote=True, allow_private_hosts=True, timeout=120)
    options = ServerOptions(model_name=MODEL, images=images, processor_source=str(tiny_checkpoint), input_workers=1)
    app = create_app(processor, engine, options)
    with TestClient(app) as client:
        yield client
    app.state.input_workers.close()
    engine.stop(0)


def _chat(url: str) -> dict:
    return {"model": MODEL, "max_tokens": 3, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What is it?"}]}]}


def _in_thread(call) -> tuple[threading.Thread, list]:
    out = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    return thread, out


def test_a_slow_image_server_holds_no_input_worker(one_worker_app):
    client, image = one_worker_app, _png()
    started, release, answered = threading.Event(), threading.Event(), threading.Event()

    def held(handler):
        started.set()
        release.wait(GUARD)
        _send(handler, image)
        answered.set()

    site = _serve(held)
    try:
        slow, slow_out = _in_thread(lambda: client.post(
            "/v1/chat/completions", json=_chat(f"http://127.0.0.1:{site.server_address[1]}/held.png")))
        assert started.wait(GUARD), "the image server was never asked"
        data_url = "data:image/png;base64," + base64.b64encode(image).decode()
        good, good_out = _in_thread(lambda: client.post("/v1/chat/completions", json=_chat(data_url)))
        good.join(GUARD)
        assert good_out, f"a data-URL request was not answered in {GUARD} s while an image download was held"
        assert good_out[0].status_code == 200, good_out[0].text
        assert not answered.is_set() and slow.is_alive()  # the slow download was still held all along
    finally:
        release.set()
    slow.join(GUARD)
    site.shutdown()
    assert slow_out and slow_out[0].status_code == 200, slow_out and slow_out[0].text


def test_remote_image_errors_name_the_param(one_worker_app):
    """Fetch errors found on the HTTP side are the same 400s as before, naming the image's field."""
    site = _serve(lambda handler: handler.send_error(404))
    try:
        r = one_worker_app.post("/v1/completions", json={
            "model": MODEL, "max_tokens": 2, "prompt": "<|image|>What is it?",
            "images": [f"http://127.0.0.1:{site.server_address[1]}/none.png"]})
    finally:
        site.shutdown()
    assert r.status_code == 400 and r.json()["error"]["param"] == "images[0]", r.text
    assert "HTTP 404" in r.json()["error"]["message"]
    r = one_worker_app.post("/v1/chat/completions", json=_chat("http://user:secret@127.0.0.1/cat.png"))
    assert r.status_code == 400 and r.json()["error"]["param"] == PARAM and "user info" in r.text


def test_the_first_pass_asks_for_remote_images_only(tiny_checkpoint):
    """Data URLs are decoded in the one pass; http(s) URLs come back as (url, param) pairs, picklable (they cross
    from the input worker), and a second pass with their bytes decodes without downloading."""
    import json
    import pickle

    from mllama.processing.processor import AutoProcessor
    from mllama.server.app import decode_request
    from mllama.server.prompts import RemoteImagesNeeded

    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint))
    options = ImageOptions(allow_remote=True)
    image = _png()
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    _, ids, _ = decode_request(processor, json.dumps(_chat(data_url)).encode(), True, MODEL, options, None)
    assert ids.count(processor.image_token_id) == 1
    remote = "http://images.invalid/cat.png"  # never resolved: the bytes are given
    body = json.dumps({"model": MODEL, "prompt": "<|image|><|image|>Both?", "images": [data_url, remote]}).encode()
    with pytest.raises(RemoteImagesNeeded) as needed:
        decode_request(processor, body, False, MODEL, options, None)
    assert pickle.loads(pickle.dumps(needed.value)).urls == [(remote, "images[1]")]
    _, ids, _ = decode_request(processor, body, False, MODEL, options, None, fetched={remote: image})
    assert ids.count(processor.image_token_id) == 2
