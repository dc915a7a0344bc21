"""Sources against real files, HTTP servers, ptys and sockets on loopback.

Nothing of OpenCV, urllib3 or pyserial is mocked. Hardware that cannot exist here (a
V4L2 camera, a Pi camera, an RTSP server) is tested through its failure paths.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent import config
from agent.sources import EndOfStream, Source, SourceError, make_source
from agent.sources.images import ImagesSource
from agent.sources.mjpeg import MjpegSource
from agent.sources.picamera import Picamera2Source
from agent.sources.sensors import SerialSource, UdpSource

# Solid colours, as RGB; the first is pure red.
COLOURS = [
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
    (128, 128, 128),
    (255, 255, 255),
    (0, 0, 0),
    (255, 128, 0),
]
WIDTH, HEIGHT = 64, 48


def bgr(rgb: tuple[int, int, int]) -> np.ndarray:
    """A frame as OpenCV writes it: BGR."""
    return np.full((HEIGHT, WIDTH, 3), rgb[::-1], np.uint8)


def colour_of(frame: np.ndarray) -> tuple[int, int, int]:
    """The frame's mean colour, each channel rounded (JPEG shifts solid colours a little)."""
    assert frame.dtype == np.uint8 and frame.shape == (HEIGHT, WIDTH, 3)
    r, g, b = (round(float(c)) for c in frame.reshape(-1, 3).mean(axis=0))
    return r, g, b


def assert_colour(frame: np.ndarray, rgb: tuple[int, int, int]) -> None:
    got = colour_of(frame)
    assert all(abs(a - b) <= 10 for a, b in zip(got, rgb, strict=True)), f"{got} is not {rgb}"


def jpeg(rgb: tuple[int, int, int]) -> bytes:
    ok, data = cv2.imencode(".jpg", bgr(rgb))
    assert ok
    return data.tobytes()


# ---------------------------------------------------------------- video file


@pytest.fixture
def video(tmp_path: Path) -> Path:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for rgb in COLOURS:
        writer.write(bgr(rgb))
    writer.release()
    return path


def test_video_yields_every_frame_in_rgb_then_ends(video: Path) -> None:
    source = make_source(config.VideoSource(path=video, fps=0))
    assert (source.name, source.live) == ("video", False)
    source.open()
    try:
        frames = [source.read(timeout=1) for _ in COLOURS]
        for frame, rgb in zip(frames, COLOURS, strict=True):
            assert frame is not None
            assert_colour(frame, rgb)
        assert frames[0] is not None and frames[0][..., 0].min() > 240  # red is channel 0
        with pytest.raises(EndOfStream):
            source.read(timeout=1)
    finally:
        source.close()
        source.close()


def test_video_with_loop_starts_again_after_the_last_frame(video: Path) -> None:
    source = make_source(config.VideoSource(path=video, loop=True, fps=0))
    source.open()
    try:
        frames = [source.read(timeout=1) for _ in range(len(COLOURS) + 2)]
    finally:
        source.close()
    for frame, rgb in zip(frames, COLOURS + COLOURS[:2], strict=True):
        assert frame is not None
        assert_colour(frame, rgb)


def test_missing_video_file_raises_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.avi"
    source = make_source(config.VideoSource(path=path))
    with pytest.raises(SourceError, match=r"nowhere\.avi.*no such file"):
        source.open()
    source.close()


# ---------------------------------------------------------------- images folder


def test_images_come_in_name_order_skipping_other_files(tmp_path: Path) -> None:
    for name, rgb in [("03.png", COLOURS[2]), ("01.png", COLOURS[0]), ("02.PNG", COLOURS[1])]:
        assert cv2.imwrite(str(tmp_path / name), bgr(rgb))
    (tmp_path / "notes.txt").write_text("not an image")
    source = make_source(config.ImagesSource(path=tmp_path))
    assert isinstance(source, ImagesSource) and not source.live
    source.open()
    for rgb in COLOURS[:3]:
        frame = source.read(timeout=1)
        assert frame is not None
        assert colour_of(frame) == rgb  # PNG is lossless
    with pytest.raises(EndOfStream):
        source.read(timeout=1)
    source.close()


def test_images_with_loop_start_again(tmp_path: Path) -> None:
    for index, rgb in enumerate(COLOURS[:2]):
        assert cv2.imwrite(str(tmp_path / f"{index}.jpg"), bgr(rgb))
    source = make_source(config.ImagesSource(path=tmp_path, loop=True))
    source.open()
    frames = [source.read(timeout=1) for _ in range(5)]
    for frame, rgb in zip(frames, [*COLOURS[:2], *COLOURS[:2], COLOURS[0]], strict=True):
        assert frame is not None
        assert_colour(frame, rgb)


def test_corrupt_image_is_skipped_counted_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert cv2.imwrite(str(tmp_path / "a.png"), bgr(COLOURS[0]))
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert cv2.imwrite(str(tmp_path / "c.png"), bgr(COLOURS[1]))
    source = make_source(config.ImagesSource(path=tmp_path))
    source.open()
    assert_colour(source.read(timeout=1), COLOURS[0])
    assert source.read(timeout=1) is None
    assert_colour(source.read(timeout=1), COLOURS[1])
    with pytest.raises(EndOfStream):
        source.read(timeout=1)
    assert source.bad_files == 1  # type: ignore[attr-defined]
    assert "skipping b.jpg" in caplog.text


@pytest.mark.parametrize("make", ["empty", "missing", "only-text"])
def test_folder_without_images_fails_at_open(tmp_path: Path, make: str) -> None:
    folder = tmp_path / "frames"
    if make != "missing":
        folder.mkdir()
    if make == "only-text":
        (folder / "readme.txt").write_text("hello")
    source = make_source(config.ImagesSource(path=folder))
    with pytest.raises(SourceError, match="frames"):
        source.open()
    source.close()


# ---------------------------------------------------------------- MJPEG over HTTP

BOUNDARY = "frame"
FRAMES = COLOURS[:6]
SERVE_S = 5  # the longest any handler waits: no test can hang on the server
CAMERA_AUTH = "Basic " + base64.b64encode(b"cam:s3cret").decode()  # user cam, password s3cret


class MjpegServer:
    """A real HTTP server on 127.0.0.1 serving ``FRAMES`` the way ``mode`` says."""

    def __init__(self, port: int = 0) -> None:
        self.mode = "length"
        self.release = threading.Event()  # ends a stall
        self.http = ThreadingHTTPServer(("127.0.0.1", port), _MjpegHandler)
        self.http.daemon_threads = True
        self.http.owner = self  # type: ignore[attr-defined]
        self.port = self.http.server_address[1]
        self.thread = threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str = "/stream.mjpg", auth: str = "") -> str:
        return f"http://{auth}127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.release.set()
        self.http.shutdown()
        self.http.server_close()


class _MjpegHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        owner: MjpegServer = self.server.owner  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):  # the client went away: fine for a stream
            self._serve(owner.mode, owner.release)

    def _serve(self, mode: str, release: threading.Event) -> None:
        if mode == "404":
            self.send_error(404)
            return
        if mode == "auth" and self.headers.get("Authorization") != CAMERA_AUTH:
            self.send_error(401)
            return
        chunked = mode == "chunked"
        if chunked:
            self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        kind = "text/html" if mode == "html" else "multipart/x-mixed-replace"
        self.send_header("Content-Type", f"{kind}; boundary={BOUNDARY}")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(data: bytes) -> None:
            if chunked:
                data = b"%x\r\n%s\r\n" % (len(data), data)
            self.wfile.write(data)

        with_length = mode != "boundary"
        parts = [self._part(jpeg(rgb), with_length) for rgb in FRAMES]
        if mode == "cut" or mode == "cut-boundary":
            parts = [self._part(jpeg(rgb), mode == "cut") for rgb in FRAMES[:3]]
            send(parts[0] + parts[1] + parts[2][: len(parts[2]) // 2])
            return  # closing here cuts the third part
        if mode == "not-jpeg":
            send(parts[0] + self._part(b"GIF89a, not a JPEG", with_length=True))
            return
        if mode == "stall":
            send(parts[0] + parts[1][: len(parts[1]) // 2])
            release.wait(SERVE_S)
            send(parts[1][len(parts[1]) // 2 :])
            return
        for part in parts:
            for piece in (part[:7], part[7:100], part[100:]):  # parts cross reads
                send(piece)
        send(f"--{BOUNDARY}--\r\n".encode())  # the closing delimiter ends the last part
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    @staticmethod
    def _part(data: bytes, with_length: bool) -> bytes:
        length = f"Content-Length: {len(data)}\r\n" if with_length else ""
        head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n{length}\r\n"
        return head.encode() + data + b"\r\n"


@pytest.fixture
def mjpeg_server() -> Iterator[MjpegServer]:
    server = MjpegServer()
    yield server
    server.stop()


def mjpeg(url: str, timeout_s: float = 5) -> MjpegSource:
    source = make_source(config.MjpegSource(url=url, timeout_s=timeout_s))
    assert isinstance(source, MjpegSource) and source.live
    return source


@pytest.mark.parametrize("mode", ["length", "boundary", "chunked"])
def test_mjpeg_frames_arrive_in_order(mjpeg_server: MjpegServer, mode: str) -> None:
    mjpeg_server.mode = mode
    source = mjpeg(mjpeg_server.url())
    source.open()
    try:
        for rgb in FRAMES:
            frame = source.read(timeout=5)
            assert frame is not None
            assert_colour(frame, rgb)
        with pytest.raises(SourceError, match="closed the connection"):
            source.read(timeout=5)  # a live stream that ends is lost
    finally:
        source.close()
    source.close()


@pytest.mark.parametrize("mode", ["cut", "cut-boundary"])
def test_mjpeg_connection_cut_mid_part_raises(mjpeg_server: MjpegServer, mode: str) -> None:
    mjpeg_server.mode = mode
    source = mjpeg(mjpeg_server.url())
    source.open()
    try:
        for rgb in FRAMES[:2]:
            frame = source.read(timeout=5)
            assert frame is not None
            assert_colour(frame, rgb)
        with pytest.raises(SourceError, match=f"127.0.0.1:{mjpeg_server.port}/stream.mjpg"):
            source.read(timeout=5)
    finally:
        source.close()


def test_mjpeg_http_error_raises_with_the_status(mjpeg_server: MjpegServer) -> None:
    mjpeg_server.mode = "404"
    source = mjpeg(mjpeg_server.url("/nothing"))
    with pytest.raises(SourceError, match=r"/nothing: HTTP 404"):
        source.open()
    source.close()


def test_mjpeg_refuses_what_is_not_a_multipart_stream(mjpeg_server: MjpegServer) -> None:
    mjpeg_server.mode = "html"
    with pytest.raises(SourceError, match=r"not an MJPEG stream.*text/html"):
        mjpeg(mjpeg_server.url()).open()


def test_mjpeg_sends_url_credentials_and_never_shows_the_password(
    mjpeg_server: MjpegServer,
) -> None:
    mjpeg_server.mode = "auth"
    source = mjpeg(mjpeg_server.url(auth="cam:s3cret@"))
    source.open()
    frame = source.read(timeout=5)
    source.close()
    assert frame is not None
    with pytest.raises(SourceError, match="HTTP 401") as refused:
        mjpeg(mjpeg_server.url(auth="cam:wrong-password@")).open()
    assert "wrong-password" not in str(refused.value) and "cam:***@" in str(refused.value)


def test_mjpeg_stall_returns_none_in_time_and_keeps_the_partial_frame(
    mjpeg_server: MjpegServer,
) -> None:
    mjpeg_server.mode = "stall"  # one frame, half of the next, then nothing until released
    source = mjpeg(mjpeg_server.url())
    source.open()
    try:
        assert source.read(timeout=5) is not None
        for _ in range(2):
            started = time.monotonic()
            assert source.read(timeout=0.2) is None
            assert time.monotonic() - started < 0.5
        mjpeg_server.release.set()
        frame = source.read(timeout=5)  # the second half completes the kept first half
        assert frame is not None
        assert_colour(frame, FRAMES[1])
    finally:
        started = time.monotonic()
        source.close()
        assert time.monotonic() - started < 1


def test_mjpeg_part_that_is_no_jpeg_raises(mjpeg_server: MjpegServer) -> None:
    mjpeg_server.mode = "not-jpeg"
    source = mjpeg(mjpeg_server.url())
    source.open()
    try:
        assert source.read(timeout=5) is not None
        with pytest.raises(SourceError, match=r"stream\.mjpg: a part of 18 bytes is not a JPEG"):
            source.read(timeout=5)
    finally:
        source.close()


def test_mjpeg_silent_for_timeout_s_is_lost(mjpeg_server: MjpegServer) -> None:
    mjpeg_server.mode = "stall"
    source = mjpeg(mjpeg_server.url(), timeout_s=0.5)
    source.open()
    try:
        assert source.read(timeout=5) is not None
        deadline = time.monotonic() + 3
        with pytest.raises(SourceError, match=r"no data within source\.timeout_s"):
            while time.monotonic() < deadline:
                source.read(timeout=0.2)
    finally:
        source.close()


def test_mjpeg_close_while_stalled_is_quick(mjpeg_server: MjpegServer) -> None:
    mjpeg_server.mode = "stall"
    source = mjpeg(mjpeg_server.url())
    source.open()
    assert source.read(timeout=5) is not None
    started = time.monotonic()
    source.close()
    assert time.monotonic() - started < 1


def test_mjpeg_reopens_once_the_server_is_back() -> None:
    server = MjpegServer()
    port, url = server.port, server.url()
    source = mjpeg(url, timeout_s=2)
    server.stop()
    with pytest.raises(SourceError, match="cannot connect"):
        source.open()
    source.close()
    server = MjpegServer(port)  # the camera is back, same address
    try:
        source.open()
        frame = source.read(timeout=5)
        assert frame is not None
        assert_colour(frame, FRAMES[0])
    finally:
        source.close()
        server.stop()
    assert server.port == port


# ---------------------------------------------------------------- serial line


@pytest.fixture
def pty() -> Iterator[tuple[int, str]]:
    """A pseudo-terminal: write to the master fd, the source opens the slave's path."""
    master, slave = os.openpty()
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(slave)
        with contextlib.suppress(OSError):  # the test closed it
            os.close(master)


def window(source: Source, timeout: float = 2) -> list[list[float]]:
    got = source.read(timeout=timeout)
    assert got is not None, "no window in time"
    assert got.dtype == np.float32
    values: list[list[float]] = got.tolist()
    return values


def test_serial_lines_become_overlapping_windows(pty: tuple[int, str]) -> None:
    master, path = pty
    settings = config.SerialSource(device=path, window=4, hop=2, channels=2)
    source = make_source(settings)
    assert isinstance(source, SerialSource) and source.live
    source.open()
    try:
        os.write(master, b"1,2\n3 4\ngarbage\n5,6\r\n7, 8\n1,2,3\n\n9\t10,\n11,12\n")
        assert window(source) == [[1, 2], [3, 4], [5, 6], [7, 8]]
        assert window(source) == [[5, 6], [7, 8], [9, 10], [11, 12]]
        assert source.bad_samples == 2  # "garbage" and the three-value line
        os.write(master, b"13,1")  # half a line: no sample yet
        started = time.monotonic()
        assert source.read(timeout=0.2) is None
        assert time.monotonic() - started < 0.5
        os.write(master, b"4\n15,16\n")
        assert window(source) == [[9, 10], [11, 12], [13, 14], [15, 16]]
    finally:
        source.close()
        source.close()


def test_serial_device_that_goes_away_raises(pty: tuple[int, str]) -> None:
    master, path = pty
    source = make_source(config.SerialSource(device=path, window=2, channels=1))
    source.open()
    try:
        os.write(master, b"1\n2\n")
        assert window(source) == [[1], [2]]
        os.close(master)  # the adapter is unplugged
        with pytest.raises(SourceError, match=path):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                source.read(timeout=0.2)
    finally:
        source.close()


def test_missing_serial_device_raises_naming_it() -> None:
    source = make_source(config.SerialSource(device="/dev/ttyUSB-does-not-exist-7"))
    with pytest.raises(SourceError, match="/dev/ttyUSB-does-not-exist-7"):
        source.open()
    source.close()


# ---------------------------------------------------------------- UDP datagrams


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def sender() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        yield sock


def test_udp_json_lines_become_windows(sender: socket.socket) -> None:
    settings = config.UdpSource(port=free_udp_port(), bind="127.0.0.1", window=3, channels=2)
    source = make_source(settings)
    assert isinstance(source, UdpSource) and source.live
    source.open()
    try:
        address = ("127.0.0.1", source.port)
        for datagram in [
            b'[1, 2]\n{"values": [3, 4]}\n',
            b"{not json",
            b"[5]",  # one value, two channels
            b'{"value": 1}',  # the same
            b'[6, 7.5]\n[8, 9]\n["a", 1]',
        ]:
            sender.sendto(datagram, address)
        assert window(source) == [[1, 2], [3, 4], [6, 7.5]]
        started = time.monotonic()
        assert source.read(timeout=0.2) is None  # [8, 9] alone is not a window
        assert time.monotonic() - started < 0.5
        assert source.bad_samples == 4
        sender.sendto(b"[10, 11]\n[12, 13]", address)
        assert window(source) == [[8, 9], [10, 11], [12, 13]]
    finally:
        source.close()
        source.close()


def test_udp_single_channel_accepts_numbers_and_value_objects(sender: socket.socket) -> None:
    source = UdpSource(config.UdpSource(port=free_udp_port(), bind="127.0.0.1", window=2))
    source.open()
    try:
        address = ("127.0.0.1", source.port)
        for datagram in [b"1\n2.5", b'{"value": 3}', b"true", b"NaN", b'{"values": [4]}']:
            sender.sendto(datagram, address)
        assert window(source) == [[1], [2.5]]
        assert window(source) == [[3], [4]]
        assert source.bad_samples == 2  # true is no number, NaN no sample
    finally:
        source.close()


def test_udp_hop_longer_than_the_window_skips_samples(sender: socket.socket) -> None:
    source = UdpSource(config.UdpSource(port=free_udp_port(), bind="127.0.0.1", window=2, hop=3))
    source.open()
    try:
        sender.sendto(b"\n".join(b"%d" % n for n in range(1, 9)), ("127.0.0.1", source.port))
        assert [window(source) for _ in range(3)] == [[[1], [2]], [[4], [5]], [[7], [8]]]
    finally:
        source.close()


def test_udp_port_in_use_raises_naming_address_and_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        source = make_source(config.UdpSource(port=port, bind="127.0.0.1"))
        with pytest.raises(SourceError, match=f"127.0.0.1:{port}"):
            source.open()
        source.close()


# ---------------------------------------------------------------- cameras and RTSP


@pytest.mark.parametrize(
    ("device", "named"),
    [("/dev/video-does-not-exist-99", "/dev/video-does-not-exist-99"), ("99", "/dev/video99")],
)
def test_missing_camera_raises_naming_the_device(device: str, named: str) -> None:
    source = make_source(config.CameraSource(device=device))
    assert (source.name, source.live) == ("camera", True)
    with pytest.raises(SourceError, match=f"{named}.*no such device"):
        source.open()
    source.close()


needs_ffmpeg = pytest.mark.skipif(
    not cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG), reason="OpenCV built without FFmpeg"
)


@needs_ffmpeg
def test_rtsp_to_a_closed_port_fails_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", raising=False)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = make_source(config.RtspSource(url=f"rtsp://127.0.0.1:{port}/x", timeout_s=2))
    assert source.live
    started = time.monotonic()
    with pytest.raises(SourceError, match=f"rtsp://127.0.0.1:{port}/x"):
        source.open()
    assert time.monotonic() - started < 4
    assert "OPENCV_FFMPEG_CAPTURE_OPTIONS" not in os.environ  # put back as it was


@needs_ffmpeg
def test_rtsp_server_that_never_answers_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", "max_delay;500000")
    with socket.socket() as silent:  # accepts (the kernel does), never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        url = f"rtsp://viewer:secret@127.0.0.1:{port}/x"
        source = make_source(config.RtspSource(url=url, transport="udp", timeout_s=1))
        started = time.monotonic()
        with pytest.raises(SourceError, match=r"viewer:\*\*\*@") as lost:
            source.open()
    assert time.monotonic() - started < 4
    assert "secret" not in str(lost.value)
    assert os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] == "max_delay;500000"


def test_picamera2_missing_says_how_to_install() -> None:
    if importlib.util.find_spec("picamera2") is not None:
        pytest.skip("picamera2 is installed: this test covers machines without it")
    source = make_source(config.Picamera2Source())
    assert isinstance(source, Picamera2Source) and source.live
    with pytest.raises(SourceError, match=r"picamera2 is not installed.*apt install"):
        source.open()
    source.close()


# ---------------------------------------------------------------- every source


def test_source_modules_import_without_device_libraries() -> None:
    code = (
        "import sys\n"
        "import agent.sources.opencv, agent.sources.mjpeg, agent.sources.images\n"
        "import agent.sources.picamera, agent.sources.sensors\n"
        "heavy = {'cv2', 'numpy', 'serial', 'picamera2', 'urllib3'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_images_without_loop_say_once_that_the_folder_is_done(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for index, rgb in enumerate(COLOURS[:2]):
        assert cv2.imwrite(str(tmp_path / f"{index}.png"), bgr(rgb))
    source = make_source(config.ImagesSource(path=tmp_path, loop=False))
    source.open()
    assert source.read(timeout=1) is not None and source.read(timeout=1) is not None
    for _ in range(3):  # asked again after the end: still the end, said once
        with pytest.raises(EndOfStream):
            source.read(timeout=1)
    done = [r for r in caplog.records if "no more frames" in r.getMessage()]
    assert [r.getMessage() for r in done] == [
        f"images source: all 2 images of {tmp_path} done (loop: false); no more frames"
    ]
    assert done[0].levelno == logging.WARNING
