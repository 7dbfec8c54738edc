"""vmtool_plugin replayed against htcondor.md's conformance vectors V1-V6, outputs parsed by classad2.

The plugin runs as the starter runs it: a separate process, argv as in FT L7075, the .out file
pre-allocated with 19,264 spaces, the sandbox in _CONDOR_SCRATCH_DIR.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import classad2
import pytest

from tests.fixtures.stage import HttpServer, StageImages, free_port
from vmtool.run import PIPE, run, spawn

pytestmark = pytest.mark.integration

PLUGIN = Path(sys.executable).parent / "vmtool_plugin"
PREALLOC = 301 * 64


@dataclass
class Job:
    sandbox: Path
    cache: Path
    env: dict[str, str]

    @property
    def infile(self) -> Path:
        return self.sandbox / ".vmtool_plugin.in"

    @property
    def outfile(self) -> Path:
        return self.sandbox / ".vmtool_plugin.out"

    def run(
        self, infile_text: str, *extra: str, timeout: float = 120
    ) -> tuple[int, list[dict[str, Any]], str]:
        self.infile.write_text(infile_text)
        self.outfile.write_bytes(b" " * PREALLOC)
        proc = run(
            [
                os.fspath(PLUGIN),
                "-infile",
                os.fspath(self.infile),
                "-outfile",
                os.fspath(self.outfile),
                *extra,
            ],
            env=self.env,
            check=False,
            timeout=timeout,
            cwd=self.sandbox,
        )
        return proc.returncode, self.ads(), proc.stderr.decode()

    def ads(self) -> list[dict[str, Any]]:
        return [dict(a) for a in classad2.parseAds(self.outfile.read_text())]

    def user_files(self) -> list[str]:
        return sorted(p.name for p in self.sandbox.iterdir() if not p.name.startswith(".vmtool_plugin."))


@pytest.fixture
def job(tmp_path: Path) -> Job:
    sandbox = tmp_path / "execute" / "dir_4242" / "scratch"
    sandbox.mkdir(parents=True)
    cache = tmp_path / "cache"
    env = {"_CONDOR_SCRATCH_DIR": os.fspath(sandbox), "VMTOOL_CACHE": os.fspath(cache)}
    return Job(sandbox, cache, env)


@pytest.fixture
def store(http_server: HttpServer, stage_images: StageImages) -> HttpServer:
    (http_server.root / "images").mkdir()
    shutil.copy(stage_images.qcow2, http_server.root / "images" / "base.qcow2")
    shutil.copy(stage_images.raw_ext4, http_server.root / "images" / "seed.iso")
    shutil.copy(stage_images.text, http_server.root / "images" / "notes.txt")
    shutil.copy(stage_images.backing_qcow2, http_server.root / "images" / "evil.qcow2")
    return http_server


def vurl(store: HttpServer, name: str) -> str:
    return f"http+vmimage://127.0.0.1:{store.port}/images/{name}"


def assert_success_ad(ad: dict[str, Any], url: str, local: str, ttype: str = "download") -> None:
    assert ad["TransferSuccess"] is True, ad.get("TransferError")
    assert ad["TransferUrl"] == url and ad["TransferFileName"] == local
    assert ad["TransferType"] == ttype
    assert ad["TransferProtocol"] == url.split("://")[0]
    assert isinstance(ad["TransferFileBytes"], int) and ad["TransferFileBytes"] > 0
    assert isinstance(ad["TransferTotalBytes"], int)
    assert isinstance(ad["TransferStartTime"], int) and ad["TransferEndTime"] >= ad["TransferStartTime"]
    assert isinstance(ad["ConnectionTimeSeconds"], float)


def assert_failure_ad(ad: dict[str, Any], url: str, local: str) -> None:
    assert ad["TransferSuccess"] is False
    assert ad["TransferUrl"] == url and ad["TransferFileName"] == local
    assert isinstance(ad["TransferError"], str) and ad["TransferError"]
    ted = ad["TransferErrorData"]
    assert len(ted) == 1
    e = dict(ted[0])
    assert e["ErrorType"] in (
        "Parameter",
        "Resolution",
        "Contact",
        "Authorization",
        "Specification",
        "Transfer",
    )
    assert isinstance(e["ErrorCode"], int) and e["ErrorString"]


def starter_outcome(returncode: int, out_text: str, upload: bool) -> tuple[str, int, int]:
    """How the starter treats a plugin run (htcondor.md 1.3 and V5): (outcome, hold code, subcode)."""
    code = 12 if upload else 13
    if returncode < 0:
        return ("held", code, -returncode)
    if returncode > 0:
        return ("held", code, returncode << 8)
    ads = [dict(a) for a in classad2.parseAds(out_text)]
    if not ads:
        return ("vacated", 0, -1004)
    if upload:
        for ad in ads:
            need = ["TransferFileName", "TransferUrl", "TransferSuccess"]
            if ad.get("TransferSuccess") is False:
                need.append("TransferError")
            if any(k not in ad for k in need) or ad.get("TransferSuccess") is not True:
                return ("held", code, 1 << 8)
    return ("ok", 0, 0)  # a download with exit 0 succeeds whatever its ads say (V5 g)


@pytest.mark.unit
def test_v5_starter_simulation_itself() -> None:
    failure = '[ TransferSuccess = false; TransferUrl = "u"; TransferFileName = "f"; TransferError = "e" ]'
    assert starter_outcome(0, " " * PREALLOC, False) == ("vacated", 0, -1004)  # a
    assert starter_outcome(0, "This is not a ClassAd!!!", False) == ("vacated", 0, -1004)  # b
    assert starter_outcome(-9, "", False) == ("held", 13, 9)  # c
    assert starter_outcome(17, "", False) == ("held", 13, 4352)  # e
    assert starter_outcome(1, failure, True) == ("held", 12, 256)
    assert starter_outcome(0, failure, False) == ("ok", 0, 0)  # g: why vmtool must never exit 0 on failure


# --- V1 ------------------------------------------------------------------------------------------


def test_v1_query() -> None:
    t0 = time.monotonic()
    proc = run([os.fspath(PLUGIN), "-classad"], timeout=20)
    assert time.monotonic() - t0 < 20
    text = proc.stdout.decode()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        assert re.match(r"^[A-Za-z_][A-Za-z0-9_]* = .+$", ln), ln
        assert "\\" not in ln
    ad = dict(classad2.parseOne(text, classad2.ParserType.Old))
    assert ad["MultipleFileSupport"] is True
    assert ad["PluginType"] == "FileTransfer"
    assert ad["PluginVersion"] == "0.1.0"
    assert ad["ProtocolVersion"] == 2
    assert set(ad["SupportedMethods"].split(",")) == {"vmimage", "nfs"}
    # The starter names a plugin by its basename up to "_plugin", upper-cased (FT L7851).
    assert PLUGIN.name.split("_plugin")[0].upper() == "VMTOOL"


# --- V2 ------------------------------------------------------------------------------------------


def test_v2_download_two_files(job: Job, store: HttpServer) -> None:
    s = job.sandbox
    u1, u2 = vurl(store, "base.qcow2"), vurl(store, "seed.iso")
    text = (
        f'[ LocalFileName = "{s}/base.qcow2"; Url = "{u1}" ][ Url = "{u2}"; LocalFileName = "{s}/seed.iso" ]'
    )
    assert "\n" not in text
    rc, ads, err = job.run(text)
    assert rc == 0, err
    assert len(ads) == 2
    pairs = {(a["TransferUrl"], a["TransferFileName"]) for a in ads}
    assert pairs == {(u1, f"{s}/base.qcow2"), (u2, f"{s}/seed.iso")}
    for ad in ads:
        assert_success_ad(ad, ad["TransferUrl"], ad["TransferFileName"])
    assert job.user_files() == ["base.qcow2", "seed.iso"]
    assert starter_outcome(rc, job.outfile.read_text(), False) == ("ok", 0, 0)
    info = run(["qemu-img", "info", "-U", os.fspath(s / "seed.iso")]).stdout.decode()
    assert "backing file format: raw" in info


@pytest.mark.parametrize("variant", ["newlines", "lowercase", "unknown-attr", "v4-nonfile-ad", "list-form"])
def test_v2_input_variants(variant: str, job: Job, store: HttpServer) -> None:
    s = job.sandbox
    u1, u2 = vurl(store, "base.qcow2"), f"vmimage://{store.root}/images/seed.iso"
    a1 = f'[ LocalFileName = "{s}/base.qcow2"; Url = "{u1}" ]'
    a2 = f'[ Url = "{u2}"; LocalFileName = "{s}/seed.iso" ]'
    text = {
        "newlines": f"{a1}\n\n{a2}\n",
        "lowercase": f'[ localfilename = "{s}/base.qcow2"; url = "{u1}" ] [ URL = "{u2}"; LOCALFILENAME = "{s}/seed.iso" ]',
        "unknown-attr": (
            f'[ LocalFileName = "{s}/base.qcow2"; PluginData = [ foo = "bar" ]; Url = "{u1}";'
            f' vmimage_PluginData = [ x = strcat("a", "b") ]; Retries = 3 + 1 ]{a2}'
        ),
        "v4-nonfile-ad": f'[ PluginData = [ a = 1 ] ][ Protocol = "vmimage"; vmimage_PluginData = [ b = 2 ] ]{a1}{a2}',
        "list-form": f"{{ {a1}, {a2} }}",
    }[variant]
    rc, ads, err = job.run(text)
    assert rc == 0, err
    assert len(ads) == 2
    for ad in ads:
        assert_success_ad(ad, ad["TransferUrl"], ad["TransferFileName"])
    assert job.user_files() == ["base.qcow2", "seed.iso"]


# --- V3 ------------------------------------------------------------------------------------------


def test_v3_one_good_one_missing(job: Job, store: HttpServer) -> None:
    s = job.sandbox
    good, bad = vurl(store, "base.qcow2"), vurl(store, "missing.qcow2")
    rc, ads, err = job.run(
        f'[ LocalFileName = "{s}/base.qcow2"; Url = "{good}" ]'
        f'[ LocalFileName = "{s}/missing.qcow2"; Url = "{bad}" ]'
    )
    assert rc == 1
    assert len(ads) == 2
    by_url = {a["TransferUrl"]: a for a in ads}
    assert_success_ad(by_url[good], good, f"{s}/base.qcow2")
    f = by_url[bad]
    assert_failure_ad(f, bad, f"{s}/missing.qcow2")
    assert f["TransferType"] == "download" and f["TransferProtocol"] == "http+vmimage"
    e = dict(f["TransferErrorData"][0])
    assert e == {
        "ErrorType": "Specification",
        "FailedServer": "127.0.0.1",
        "ErrorCode": 404,
        "ErrorString": "not found",
    }
    assert "404" in f["TransferError"]
    assert job.user_files() == ["base.qcow2"]
    assert starter_outcome(rc, job.outfile.read_text(), False) == ("held", 13, 256)


# --- V4 ------------------------------------------------------------------------------------------


def test_v4_upload(job: Job, store: HttpServer) -> None:
    s = job.sandbox
    (s / "out1.qcow2").write_bytes(b"first output\n" * 100)
    (s / "out2.log").write_bytes(b"second\n")
    u1 = f"http+vmimage://127.0.0.1:{store.port}/up/out1.qcow2"
    u2 = f"http+vmimage://127.0.0.1:{store.port}/up/out2.log"
    u3 = f"http+vmimage://127.0.0.1:{store.port}/up/gone"
    rc, ads, err = job.run(
        f'[ LocalFileName = "{s}/out1.qcow2"; Url = "{u1}" ][ Url = "{u2}"; '
        f'LocalFileName = "{s}/out2.log" ]',
        "-upload",
    )
    assert rc == 0, err
    assert len(ads) == 2
    for ad in ads:
        assert_success_ad(ad, ad["TransferUrl"], ad["TransferFileName"], "upload")
    assert store.uploads["/up/out1.qcow2"] == (s / "out1.qcow2").read_bytes()
    assert store.uploads["/up/out2.log"] == b"second\n"
    assert starter_outcome(rc, job.outfile.read_text(), True) == ("ok", 0, 0)
    # A failed upload still names its file and URL (else the starter holds the job after exit 0).
    rc, ads, _ = job.run(f'[ LocalFileName = "{s}/absent"; Url = "{u3}" ]', "-upload")
    assert rc == 1 and len(ads) == 1
    assert_failure_ad(ads[0], u3, f"{s}/absent")
    assert ads[0]["TransferType"] == "upload"
    assert starter_outcome(rc, job.outfile.read_text(), True) == ("held", 12, 256)


# --- V5 and the bad inputs ----------------------------------------------------------------


def test_v5f_bad_argv() -> None:
    for argv in (["-infile", "x"], [], ["-bogus"], ["-infile", "a", "-outfile"], ["one"]):
        proc = run([os.fspath(PLUGIN), *argv], check=False, timeout=20)
        err = proc.stderr.decode()
        assert proc.returncode != 0, argv
        assert "usage:" in err and "Traceback" not in err, argv


def test_v5_malformed_infile_still_writes_an_ad(job: Job) -> None:
    for text in ("This is not a ClassAd!!!", '[ Url = "vmimage:///x"; LocalFileName = ', "[ Url = ]"):
        rc, ads, err = job.run(text)
        assert rc == 1 and "Traceback" not in err
        assert len(ads) == 1 and ads[0]["TransferSuccess"] is False
        assert "input file" in ads[0]["TransferError"]
        assert "TransferUrl" in ads[0] and "TransferFileName" in ads[0]
    # An unreadable infile too.
    job.outfile.write_bytes(b" " * PREALLOC)
    proc = run(
        [
            os.fspath(PLUGIN),
            "-infile",
            os.fspath(job.sandbox / "nope.in"),
            "-outfile",
            os.fspath(job.outfile),
        ],
        env=job.env,
        check=False,
    )
    assert proc.returncode == 1 and job.ads()[0]["TransferSuccess"] is False


@pytest.mark.parametrize(
    "case",
    [
        "scheme",
        "unreachable",
        "404",
        "checksum",
        "not-image",
        "backing",
        "escape",
        "escape-nfs",
        "relative-escape",
        "cache-unwritable",
        "disk-full",
    ],
)
def test_bad_inputs_give_failure_ads(
    case: str, job: Job, store: HttpServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    s = job.sandbox
    local = f"{s}/disk.qcow2"
    sha_wrong = "ab" * 32
    url = {
        "scheme": "gopher+vmimage://127.0.0.1/images/base.qcow2",
        "unreachable": f"http+vmimage://127.0.0.1:{free_port()}/images/base.qcow2",
        "404": vurl(store, "nothere.qcow2"),
        "checksum": vurl(store, "base.qcow2") + f"#sha256={sha_wrong}",
        "not-image": vurl(store, "notes.txt"),
        "backing": vurl(store, "evil.qcow2"),
        "escape": vurl(store, "base.qcow2"),
        "escape-nfs": f"nfs://{store.root}/images/base.qcow2:../../escaped.qcow2",
        "relative-escape": vurl(store, "base.qcow2"),
        "cache-unwritable": vurl(store, "base.qcow2"),
        "disk-full": vurl(store, "big.img"),
    }[case]
    expect_type = None
    if case == "escape":
        local = os.fspath(tmp_path / "escaped.qcow2")
    if case == "relative-escape":
        local = "../../escaped.qcow2"
    if case == "cache-unwritable":
        (tmp_path / "afile").write_text("")
        job.env["VMTOOL_CACHE"] = os.fspath(tmp_path / "afile" / "cache")
    if case == "disk-full":
        with open(store.root / "images" / "big.img", "wb") as f:  # 8 MiB of data, MBR-signed
            f.write(os.urandom(8 << 20))
            f.seek(510)
            f.write(b"\x55\xaa")
        job.cache = request.getfixturevalue("tmpfs")("size=4m") / "cache"
        job.env["VMTOOL_CACHE"] = os.fspath(job.cache)
        expect_type = ("Transfer", "NoSpace")
    if case == "404":
        expect_type = ("Specification", None)
    rc, ads, err = job.run(f'[ LocalFileName = "{local}"; Url = "{url}" ]')
    assert rc == 1 and "Traceback" not in err
    assert len(ads) == 1
    assert_failure_ad(ads[0], url, local)
    if expect_type:
        ted = dict(ads[0]["TransferErrorData"][0])
        assert (ted["ErrorType"], ted.get("FailureType")) == expect_type
    assert job.user_files() == []
    assert not list(tmp_path.rglob("escaped.qcow2"))
    if (job.cache / "bases").is_dir():
        assert list((job.cache / "bases").iterdir()) == []
        assert list((job.cache / "tmp").iterdir()) == []


def test_legacy_nfs_form(job: Job, stage_images: StageImages) -> None:
    s = job.sandbox
    url = f"nfs://{stage_images.qcow2}:vmimage.img"
    rc, ads, err = job.run(f'[ LocalFileName = "{s}/base.qcow2:vmimage.img"; Url = "{url}" ]')
    assert rc == 0, err
    assert_success_ad(ads[0], url, f"{s}/base.qcow2:vmimage.img")
    assert job.user_files() == ["vmimage.img"]
    info = run(["qemu-img", "info", "-U", os.fspath(s / "vmimage.img")]).stdout.decode()
    assert "backing file format: qcow2" in info


def test_legacy_single_file_form(job: Job, stage_images: StageImages, store: HttpServer) -> None:
    s = job.sandbox
    url = f"vmimage://{stage_images.qcow2}"
    proc = run([os.fspath(PLUGIN), url, f"{s}/base.qcow2"], env=job.env, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    ad = dict(classad2.parseOne(proc.stdout.decode(), classad2.ParserType.Old))
    assert ad["TransferSuccess"] is True and ad["TransferUrl"] == url
    assert (s / "base.qcow2").is_file()
    bad = vurl(store, "nothere.qcow2")
    proc = run([os.fspath(PLUGIN), bad, f"{s}/x.qcow2"], env=job.env, check=False)
    ad = dict(classad2.parseOne(proc.stdout.decode(), classad2.ParserType.Old))
    assert proc.returncode == 1 and ad["TransferSuccess"] is False and ad["TransferUrl"] == bad
    assert "404" in ad["TransferError"]


def test_time_bound_and_sigterm_still_write_ads(job: Job, store: HttpServer) -> None:
    s = job.sandbox
    store.slow["/images/seed.iso"] = 0.2  # 8 MiB at 64 KiB per 0.2 s: far longer than the bound
    u1, u2 = vurl(store, "seed.iso"), vurl(store, "base.qcow2")
    text = (
        f'[ LocalFileName = "{s}/seed.iso"; Url = "{u1}" ][ LocalFileName = "{s}/base.qcow2"; Url = "{u2}" ]'
    )
    job.env["VMTOOL_PLUGIN_TIMEOUT"] = "1.5"
    t0 = time.monotonic()
    rc, ads, err = job.run(text, timeout=60)
    assert time.monotonic() - t0 < 20
    assert rc == 1 and len(ads) == 2
    for ad in ads:
        assert_failure_ad(ad, ad["TransferUrl"], ad["TransferFileName"])
        assert dict(ad["TransferErrorData"][0])["FailureType"] == "TimedOut"
    assert starter_outcome(rc, job.outfile.read_text(), False) == ("held", 13, 256)
    assert job.user_files() == []
    # SIGTERM in the middle of a fetch.
    del job.env["VMTOOL_PLUGIN_TIMEOUT"]
    job.infile.write_text(text)
    job.outfile.write_bytes(b" " * PREALLOC)
    env = dict(os.environ, **job.env)
    p = spawn(
        [os.fspath(PLUGIN), "-infile", os.fspath(job.infile), "-outfile", os.fspath(job.outfile)],
        env=env,
        stdout=PIPE,
        stderr=PIPE,
    )
    deadline = time.monotonic() + 30
    while store.gets["/images/seed.iso"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=30)
    assert p.returncode == 1
    ads = job.ads()
    assert len(ads) == 2 and all(a["TransferSuccess"] is False for a in ads)
    assert job.user_files() == []


# --- V6 ------------------------------------------------------------------------------------------


def test_v6_escaping_through_the_writer(tmp_path: Path) -> None:
    from vmtool.condor.plugin import ResultWriter, failure_ad

    out = tmp_path / "out"
    out.write_bytes(b" " * PREALLOC)
    msg = 'a"b\\c\nd'
    ResultWriter(os.fspath(out)).write(
        [failure_ad("vmimage:///x", "/s/x", False, time.time(), ValueError(msg))]
    )
    text = out.read_text()
    assert '\\"b\\\\c\\nd' in text
    ad = dict(classad2.parseAds(text).__next__())
    assert ad["TransferError"].endswith(msg)
    assert len(text) < PREALLOC  # truncated after writing: no stale bytes remain


# --- other transports through the plugin ----------------------------------------------------------


def test_s3_and_sftp_transports(job: Job, stage_images: StageImages, moto_s3: Any, sshd: Any) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=moto_s3.endpoint,
        **{"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"},
    )
    s3.create_bucket(Bucket="vmimages")
    s3.upload_file(os.fspath(stage_images.qcow2), "vmimages", "debian/base.qcow2")
    shutil.copy(stage_images.raw_ext4, sshd.root / "seed.img")
    job.env.update(
        moto_s3.env,
        AWS_ENDPOINT_URL=moto_s3.endpoint,
        VMTOOL_SSH_KEY=os.fspath(sshd.key),
        VMTOOL_KNOWN_HOSTS=os.fspath(sshd.known_hosts),
    )
    s = job.sandbox
    u1 = "s3+vmimage://vmimages/debian/base.qcow2"
    u2 = f"sftp+vmimage://{sshd.user}@127.0.0.1:{sshd.port}{sshd.root}/seed.img"
    rc, ads, err = job.run(
        f'[ LocalFileName = "{s}/base.qcow2"; Url = "{u1}" ]'
        f'[ LocalFileName = "{s}/seed.qcow2"; Url = "{u2}" ]'
    )
    assert rc == 0, err
    for ad in ads:
        assert_success_ad(ad, ad["TransferUrl"], ad["TransferFileName"])
    assert job.user_files() == ["base.qcow2", "seed.qcow2"]
    # Upload the job's output to S3 and over SFTP.
    (s / "result.bin").write_bytes(b"result" * 1000)
    u3 = "s3+vmimage://vmimages/out/result.bin"
    u4 = f"sftp+vmimage://{sshd.user}@127.0.0.1:{sshd.port}{sshd.root}/result.bin"
    rc, ads, err = job.run(
        f'[ LocalFileName = "{s}/result.bin"; Url = "{u3}" ]'
        f'[ LocalFileName = "{s}/result.bin"; Url = "{u4}" ]',
        "-upload",
    )
    assert rc == 0, err
    assert s3.get_object(Bucket="vmimages", Key="out/result.bin")["Body"].read() == b"result" * 1000
    assert (sshd.root / "result.bin").read_bytes() == b"result" * 1000


def test_a_crash_inside_still_writes_failure_ads(job: Job, tmp_path: Path, store: HttpServer) -> None:
    # A broken third-party module (here: boto3 that raises on import) is a crash inside the plugin
    # process, not a vmtool error: it must still become a failure ad, and other files still transfer.
    fake = tmp_path / "fakelibs" / "boto3"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('boto3 is broken on this node')\n")
    job.env["PYTHONPATH"] = os.fspath(tmp_path / "fakelibs")
    s = job.sandbox
    u1, u2 = "s3+vmimage://bucket/base.qcow2", vurl(store, "base.qcow2")
    rc, ads, err = job.run(
        f'[ LocalFileName = "{s}/a.qcow2"; Url = "{u1}" ][ LocalFileName = "{s}/b.qcow2"; Url = "{u2}" ]'
    )
    assert rc == 1 and len(ads) == 2
    by_url = {a["TransferUrl"]: a for a in ads}
    assert_failure_ad(by_url[u1], u1, f"{s}/a.qcow2")
    assert "boto3 is broken" in by_url[u1]["TransferError"]
    assert dict(by_url[u1]["TransferErrorData"][0])["ErrorType"] == "Parameter"
    assert_success_ad(by_url[u2], u2, f"{s}/b.qcow2")
    assert job.user_files() == ["b.qcow2"]


def test_startup_test_url_without_scratch_dir(tmp_path: Path, stage_images: StageImages) -> None:
    # <PLUGIN>_TEST_URL: the starter downloads into a temporary directory, with no job sandbox set;
    # the directory holding the -infile is then the one the plugin may write in.
    tmpdir = tmp_path / "starter-test"
    tmpdir.mkdir()
    infile, outfile = tmpdir / ".vmtool_plugin.in", tmpdir / ".vmtool_plugin.out"
    url = f"vmimage://{stage_images.qcow2}"
    infile.write_text(f'[ LocalFileName = "{tmpdir}/test.qcow2"; Url = "{url}" ]')
    env = {"VMTOOL_CACHE": os.fspath(tmp_path / "cache"), "_CONDOR_SCRATCH_DIR": ""}
    proc = run(
        [os.fspath(PLUGIN), "-infile", os.fspath(infile), "-outfile", os.fspath(outfile)],
        env=env,
        check=False,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr.decode()
    (ad,) = [dict(a) for a in classad2.parseAds(outfile.read_text())]
    assert_success_ad(ad, url, f"{tmpdir}/test.qcow2")
    # ... but still nowhere else.
    infile.write_text(f'[ LocalFileName = "{tmp_path}/elsewhere.qcow2"; Url = "{url}" ]')
    proc = run(
        [os.fspath(PLUGIN), "-infile", os.fspath(infile), "-outfile", os.fspath(outfile)],
        env=env,
        check=False,
        cwd="/",
    )
    assert proc.returncode == 1 and not (tmp_path / "elsewhere.qcow2").exists()


def test_upload_flattens_staged_overlays_and_refuses_foreign_backing(
    job: Job, store: HttpServer, stage_images: StageImages, tmp_path: Path
) -> None:
    s = job.sandbox
    url = f"vmimage://{stage_images.qcow2}"
    rc, _, err = job.run(f'[ LocalFileName = "{s}/disk.qcow2"; Url = "{url}" ]')
    assert rc == 0, err
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", os.fspath(s / "disk.qcow2")])
    up = f"http+vmimage://127.0.0.1:{store.port}/out/disk.qcow2"
    rc, ads, err = job.run(f'[ LocalFileName = "{s}/disk.qcow2"; Url = "{up}" ]', "-upload")
    assert rc == 0, err
    assert_success_ad(ads[0], up, f"{s}/disk.qcow2", "upload")
    got = tmp_path / "uploaded.qcow2"
    got.write_bytes(store.uploads["/out/disk.qcow2"])
    info = run(["qemu-img", "info", "--output=json", os.fspath(got)]).stdout.decode()
    assert "backing-filename" not in info
    run(["qemu-img", "compare", "-q", os.fspath(got), os.fspath(s / "disk.qcow2")])
    assert job.user_files() == ["disk.qcow2"]  # the flattened temporary copy is gone
    # An overlay whose header names a host file is not read, whatever the job wrote into it.
    shutil.copy(stage_images.backing_qcow2, s / "evil.qcow2")
    up2 = f"http+vmimage://127.0.0.1:{store.port}/out/evil.qcow2"
    rc, ads, _ = job.run(f'[ LocalFileName = "{s}/evil.qcow2"; Url = "{up2}" ]', "-upload")
    assert rc == 1
    assert_failure_ad(ads[0], up2, f"{s}/evil.qcow2")
    assert "not a base in vmtool's cache" in ads[0]["TransferError"]
    assert "/out/evil.qcow2" not in store.uploads


def test_vmimage_host_form_is_https(job: Job, https_server: Any, stage_images: StageImages) -> None:
    srv = https_server.server
    (srv.root / "images").mkdir()
    shutil.copy(stage_images.qcow2, srv.root / "images" / "base.qcow2")
    s = job.sandbox
    url = f"vmimage://127.0.0.1:{srv.port}/images/base.qcow2"
    # Not trusted yet: a clear failure, nothing written.
    rc, ads, _ = job.run(f'[ LocalFileName = "{s}/base.qcow2"; Url = "{url}" ]')
    assert rc == 1
    assert_failure_ad(ads[0], url, f"{s}/base.qcow2")
    assert "TLS certificate" in ads[0]["TransferError"]
    assert dict(ads[0]["TransferErrorData"][0])["ErrorType"] == "Authorization"
    assert job.user_files() == []
    # With the site's CA installed, the same URL stages over https.
    job.env["SSL_CERT_FILE"] = os.fspath(https_server.ca)
    rc, ads, err = job.run(f'[ LocalFileName = "{s}/base.qcow2"; Url = "{url}" ]')
    assert rc == 0, err
    assert_success_ad(ads[0], url, f"{s}/base.qcow2")
    assert srv.gets["/images/base.qcow2"] == 1
