"""The real components a benchmark drives: docker-registry (an origin or a
pull-through cache), the nginx cluster tier, generated models, `modelcache
serve` daemons and their API, and the limit pipeline."""

import hashlib
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request

from .common import MIB, ROOT, free_port, log, run, timed

REFERENCE_PLUGINS = ["exclude-patterns", "quota-watermark", "gc-lru-watermark"]


def need_tools():
    """docker-registry, skopeo, curl, openssl, nginx: installed when running as
    root; matplotlib with pip."""
    missing = [
        package
        for tool, package in [("docker-registry", "docker-registry"), ("skopeo", "skopeo"), ("curl", "curl"),
                              ("openssl", "openssl"), ("nginx", "nginx-light")]
        if shutil.which(tool) is None
    ]
    try:
        import matplotlib  # noqa: F401  (B9's picture)
    except ImportError:
        log("installing matplotlib")
        run(sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "matplotlib")
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing tools: {' '.join(missing)} (apt-get install {' '.join(missing)})")
    log(f"installing {' '.join(missing)}")
    run("apt-get", "update", "-qq")
    run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing)


def build(profile):
    log(f"{profile} build of modelcache and the reference policies")
    run("cargo", "build", "--profile", profile, "-p", "modelcache", cwd=ROOT)
    run("cargo", "build", "--profile", "plugin", "--target", "wasm32-wasip2",
        *[arg for name in REFERENCE_PLUGINS for arg in ("-p", name)], cwd=ROOT)
    metadata = json.loads(run("cargo", "metadata", "--format-version", "1", "--no-deps",
                              cwd=ROOT, capture_output=True).stdout)
    return metadata["target_directory"]


class Registry:
    """A loopback docker-registry whose access log counts blob bytes served;
    with `proxy`, a pull-through cache of that registry."""

    LINE = re.compile(r'"GET /v2/(?P<repo>.+?)/blobs/(?P<digest>sha256:[0-9a-f]{64}) HTTP/[0-9.]+" (?P<status>\d{3}) (?P<bytes>\d+)')

    def __init__(self, work, name="registry", proxy=None):
        self.log_path = os.path.join(work, f"{name}.log")
        self.storage = os.path.join(work, name)
        self.wipe = proxy is not None  # a cache goes with its run; the origin's models stay for the next
        config = os.path.join(work, f"{name}.yml")
        with open(config, "w") as out:
            out.write(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
                      "http:\n  addr: 127.0.0.1:0\n")
            if proxy:
                out.write(f"proxy:\n  remoteurl: http://{proxy.host}\n")
        env = dict(os.environ, REGISTRY_HTTP_ADDR="127.0.0.1:0", REGISTRY_LOG_LEVEL="info")
        self.process = subprocess.Popen(["docker-registry", "serve", config], env=env,
                                        stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        for _ in range(200):
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", open(self.log_path).read())
            if match:
                self.host = f"127.0.0.1:{match.group(1)}"
                return
            time.sleep(0.05)
        sys.exit("docker-registry did not start")

    def mark(self):
        return os.path.getsize(self.log_path)

    def blob_bytes_since(self, mark, repo):
        """(requests, bytes) of blob GETs of `repo` logged after `mark`."""
        with open(self.log_path) as log_file:
            log_file.seek(mark)
            hits = [m for m in map(self.LINE.search, log_file) if m and m.group("repo") == repo]
        return len(hits), sum(int(m.group("bytes")) for m in hits)

    def blob_url(self, repo, digest):
        return f"http://{self.host}/v2/{repo}/blobs/{digest}"

    def stop(self):
        self.process.terminate()
        self.process.wait()
        if self.wipe:
            shutil.rmtree(self.storage, ignore_errors=True)


class NginxTier(Registry):
    """The shipped coalescing tier (deploy/cluster-tier/nginx.conf.template)
    in front of `origin`, its access log read like a registry's."""

    def __init__(self, work, origin):
        self.dir = os.path.join(work, "nginx-tier")
        self.storage = os.path.join(self.dir, "cache")
        os.makedirs(self.storage)
        self.log_path = os.path.join(self.dir, "access.log")
        open(self.log_path, "w").close()
        self.host = f"127.0.0.1:{free_port()}"
        with open(os.path.join(ROOT, "deploy", "cluster-tier", "nginx.conf.template")) as template:
            config = (template.read().replace("${ORIGIN}", f"http://{origin.host}").replace("${LISTEN}", self.host)
                      .replace("${CACHE}", self.storage).replace("${CACHE_SIZE}", "8g")
                      .replace("http {", f"http {{\n    access_log {self.log_path};", 1))
        with open(os.path.join(self.dir, "nginx.conf"), "w") as out:
            out.write(config)
        pid = os.path.join(self.dir, "nginx.pid")
        self.process = subprocess.Popen(["nginx", "-p", self.dir, "-c", os.path.join(self.dir, "nginx.conf"),
                                         "-e", os.path.join(self.dir, "error.log"),
                                         "-g", f"daemon off; user root; pid {pid};"])
        for _ in range(200):
            if os.path.exists(pid):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        sys.exit(f"nginx did not start; see {self.dir}/error.log")

    def stop(self):
        self.process.terminate()
        self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def random_file(path, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as out:
        left = size
        while left:
            chunk = min(left, 8 * MIB)
            out.write(os.urandom(chunk))
            left -= chunk


class Models:
    """The generated models, pushed; their manifests and sizes."""

    def __init__(self, modelcache, registry, work, quick):
        self.modelcache, self.registry = modelcache, registry
        scale = 32 if quick else 1
        specs = {
            "big": [("model.safetensors", 1024 * MIB // scale)],
            "multi": [(f"model-{i:05}-of-00008.safetensors", 128 * MIB // scale) for i in range(1, 9)],
            "small": [(f"shard-{i // 100:02}/file-{i:04}.json", 4096) for i in range(100 if quick else 1000)],
        }
        self.repos, self.refs, self.bytes = {}, {}, {}
        for name, files in specs.items():
            directory = os.path.join(work, "models", name)
            for path, size in files:
                random_file(os.path.join(directory, path), size)
            repo = f"bench/{name}"
            self.repos[name], self.refs[name] = repo, f"{registry.host}/{repo}:v1"
            self.bytes[name] = sum(size for _, size in files)
            log(f"pushing {name}: {len(files)} files, {self.bytes[name] / MIB:.0f} MiB")
            run(modelcache, "push", directory, self.refs[name], "--insecure-registry", registry.host,
                stdout=subprocess.DEVNULL)

    def layers(self, name):
        request = urllib.request.Request(
            f"http://{self.registry.host}/v2/{self.repos[name]}/manifests/v1",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        with urllib.request.urlopen(request) as answer:
            return [layer["digest"] for layer in json.load(answer)["layers"]]


class Daemon:
    """`modelcache serve` on its own root, with the reference policies."""

    def __init__(self, modelcache, work, registry, plugins, name, layer_concurrency=None, root=None, mirror=None):
        self.modelcache = modelcache
        self.root = root or os.path.join(work, name)
        self.socket = os.path.join(work, f"{name}.sock")
        self.metrics_port = free_port()
        config = os.path.join(work, f"{name}.toml")
        with open(config, "w") as out:
            out.write(f'root = "{self.root}"\nplugin-dir = "{plugins}"\n'
                      f'[registries]\ninsecure = {json.dumps([registry.host] + ([mirror.host] if mirror else []))}\n'
                      + (f'[registries.mirrors."{registry.host}"]\nendpoints = ["http://{mirror.host}"]\n' if mirror else "") +
                      f'[api]\nsocket = "{self.socket}"\nvolume-sockets = "{work}/{name}-volumes"\n'
                      f'[gc]\ninterval = "0"\n[metrics]\naddress = "127.0.0.1:{self.metrics_port}"\n')
            if layer_concurrency:
                out.write(f"[downloads]\nconcurrency = {layer_concurrency}\nlayer-concurrency = {layer_concurrency}\n")
        started = time.perf_counter()
        self.process = subprocess.Popen([modelcache, "serve", "--config", config],
                                        stderr=open(os.path.join(work, f"{name}.log"), "a"))
        while run(modelcache, "health", "--socket", self.socket, check=False,
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
            if self.process.poll() is not None:
                sys.exit(f"the daemon exited; see {work}/{name}.log")
            time.sleep(0.005)
        self.ready_seconds = time.perf_counter() - started

    def mount(self, reference, volume):
        return timed(self.modelcache, "mount", reference, "--volume", volume, "--socket", self.socket,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def mount_json(self, reference, volume):
        answer = run(self.modelcache, "mount", reference, "--volume", volume, "--socket", self.socket, "--json",
                     capture_output=True)
        return json.loads(answer.stdout)

    def plugin_calls(self):
        """Every plugin call the daemon made so far, from its metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as page:
            return sum(float(line.rsplit(" ", 1)[1]) for line in page.read().decode().splitlines()
                       if line.startswith("modelcache_plugin_calls_total"))

    def memory(self, field):
        """A `/proc/PID/status` memory figure in bytes: `VmRSS` now, `VmHWM` at peak."""
        with open(f"/proc/{self.process.pid}/status") as status:
            return int(re.search(rf"{field}:\s+(\d+) kB", status.read()).group(1)) * 1024

    def stop(self, wipe=True):
        self.process.send_signal(signal.SIGTERM)
        self.process.wait()
        if wipe:
            shutil.rmtree(self.root, ignore_errors=True)


class CpuBusy:
    """The share of all cores' time spent busy from creation to `share()`, from
    /proc/stat (iowait counts as idle). Near 100 % means the machine's CPUs,
    not one code path, set the pace."""

    def __init__(self):
        self.start = self.sample()

    @staticmethod
    def sample():
        with open("/proc/stat") as stat:
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in stat.readline().split()[1:9])
        return user + nice + system + irq + softirq + steal, idle + iowait

    def share(self):
        (busy, idle), (busy0, idle0) = self.sample(), self.start
        return (busy - busy0) / max(1, busy - busy0 + idle - idle0)


def limit_pipeline(url, path):
    """curl | tee FILE | openssl dgst -sha256, then sync FILE: download,
    hash and write overlapped, with the CPU's SHA instructions."""
    return timed("bash", "-c", f'set -o pipefail; curl -sf "{url}" | tee "{path}" | openssl dgst -sha256 >/dev/null '
                 f'&& sync "{path}"')


class UnixHttp(http.client.HTTPConnection):
    """An HTTP connection over a unix socket (the daemon's API)."""

    def __init__(self, path):
        super().__init__("localhost", timeout=600)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.socket_path)


def api(daemon, method, path, body=None):
    """One request to the daemon's API; the parsed answer, which must be a success."""
    connection = UnixHttp(daemon.socket)
    connection.request(method, path, body=json.dumps(body) if body is not None else None,
                       headers={"Content-Type": "application/json"})
    answer = connection.getresponse()
    data = answer.read()
    connection.close()
    if answer.status >= 300:
        sys.exit(f"{method} {path}: {answer.status} {data[:500]!r}")
    return json.loads(data) if data else None


def push_artifact(registry, repo, layers):
    """Pushes `layers` ((file path, media type, bytes)) as the ModelPack model
    `repo:v1` with the registry's HTTP API (no process per model); its
    reference by digest."""
    def send(method, path, body=None, content_type="application/octet-stream", expect=None):
        connection = http.client.HTTPConnection(registry.host)
        connection.request(method, path, body=body, headers={"Content-Type": content_type})
        answer = connection.getresponse()
        answer.read()
        if expect and answer.status != expect:
            sys.exit(f"{method} {path}: {answer.status}")
        return answer

    def upload(content):
        digest = "sha256:" + hashlib.sha256(content).hexdigest()
        location = send("POST", f"/v2/{repo}/blobs/uploads/", expect=202).getheader("Location")
        location = location.replace(f"http://{registry.host}", "")
        separator = "&" if "?" in location else "?"
        send("PUT", f"{location}{separator}digest={digest}", content, expect=201)
        return {"digest": digest, "size": len(content)}

    config = upload(b"{}")
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.cncf.model.manifest.v1+json",
        "config": {"mediaType": "application/vnd.cncf.model.config.v1+json", **config},
        "layers": [{"mediaType": media_type, **upload(content), "annotations": {"org.cncf.model.filepath": path}}
                   for path, media_type, content in layers],
    }).encode()
    send("PUT", f"/v2/{repo}/manifests/v1", manifest, "application/vnd.oci.image.manifest.v1+json", expect=201)
    return f"{registry.host}/{repo}@sha256:{hashlib.sha256(manifest).hexdigest()}"


def tar_layer(names):
    """An uncompressed tar of small files named `names`, each holding its name."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name in names:
            data = name.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()
