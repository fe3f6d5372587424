"""B9: how each operation's cost grows with the node's state (volumes,
cached models, files in a model), and the picture of it."""

import os
import shutil
import statistics
import subprocess

from .common import MIB, WARM_SAMPLES, human_seconds, log, timed
from .fixtures import Daemon, api, push_artifact, tar_layer


def many_files_model(registry, files):
    """A model of `files` small files in directories of 1,000, one tar layer
    per directory (`modelcache push` makes a layer per file: ~15 ms each)."""
    layers = []
    for directory in range(0, files, 1000):
        names = [f"d{directory // 1000:03}/f{i:06}.json" for i in range(directory, min(files, directory + 1000))]
        layers.append((f"d{directory // 1000:03}", "application/vnd.cncf.model.code.v1.tar", tar_layer(names)))
    return push_artifact(registry, f"bench/files-{files}", layers)


def scale_curves(modelcache, registry, work, plugins, quick):
    """B9: what each operation costs as the node's state grows, one daemon
    growing through the sizes; per size, every figure and the time per item."""
    steps = [(10, 2), (40, 4)] if quick else [(10, 10), (100, 10), (1000, 100), (10000, 1000)]
    file_counts = [100, 1000] if quick else [100, 1000, 10000, 100000]
    scratch = os.path.join(work, "b9")
    os.makedirs(scratch)
    curves = {"state": [], "files": []}
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    daemon = Daemon(modelcache, scratch, registry, plugins, "b9")
    models, volumes = [], 0
    for volume_count, model_count in steps:
        log(f"B9: growing to {volume_count} volumes over {model_count} models")
        while len(models) < model_count:
            index = len(models)
            models.append(push_artifact(registry, f"bench/scale-{index:05}",
                                        [("weights.bin", "application/vnd.cncf.model.weight.v1.raw",
                                          f"model {index}\n".encode() * 64)]))
            api(daemon, "POST", "/v1/prefetch", {"reference": models[-1], "wait-seconds": 600})
        # Volumes name the first half of the models; the other half is what GC may collect.
        in_use = models[:max(1, len(models) // 2)]
        while volumes < volume_count:
            api(daemon, "PUT", f"/v1/volumes/v{volumes:06}/default",
                {"reference": in_use[volumes % len(in_use)], "wait-seconds": 600})
            volumes += 1
        point = {"volumes": volume_count, "models": model_count}
        mounts, unmounts = [], []
        for sample in range(WARM_SAMPLES):
            mounts.append(timed(modelcache, "mount", models[0], "--volume", f"probe-{sample}", "--socket", daemon.socket, **quiet))
            unmounts.append(timed(modelcache, "unmount", "--volume", f"probe-{sample}", "--socket", daemon.socket, **quiet))
        point["warm-mount"], point["unmount"] = statistics.median(mounts), statistics.median(unmounts)
        for command in ["ls", "du", "gc"]:
            point[command] = timed(modelcache, command, "--socket", daemon.socket, **quiet)
        point["rss"] = daemon.memory("VmRSS")
        daemon.stop(wipe=False)
        daemon = Daemon(modelcache, scratch, registry, plugins, "b9", root=daemon.root)
        point["start-up"] = daemon.ready_seconds
        curves["state"].append(point)

    for files in file_counts:
        log(f"B9: a model of {files} files")
        reference = many_files_model(registry, files)
        tree = api(daemon, "PUT", f"/v1/volumes/files-{files}/default", {"reference": reference, "wait-seconds": 600})["path"]
        ours, theirs = [], []
        for sample in range(WARM_SAMPLES):
            ours.append(timed(modelcache, "mount", reference, "--volume", f"files-{files}-{sample}", "--socket",
                              daemon.socket, **quiet))
            copy = os.path.join(scratch, f"cp-al-{files}-{sample}")
            theirs.append(timed("cp", "-al", tree, copy))
            shutil.rmtree(copy)
        curves["files"].append({"files": files, "warm-mount": statistics.median(ours), "cp-al": statistics.median(theirs),
                                "ratio": statistics.median(a / b for a, b in zip(ours, theirs)), "rss": daemon.memory("VmRSS")})
    daemon.stop()
    shutil.rmtree(scratch, ignore_errors=True)
    return curves


def scale_rows(curves):
    """B9's goals: warm mount and unmount flat in the volumes mounted, warm
    mount of any number of files within 1.2x of `cp -al`."""
    rows = []
    state, smallest = curves["state"], curves["state"][0]
    for point in state[1:]:
        for key in ["warm-mount", "unmount"]:
            ratio = point[key] / smallest[key]
            rows.append((f"B9 {key} with {point['volumes']} volumes vs with {smallest['volumes']}",
                         human_seconds(point[key]), human_seconds(smallest[key]), ratio, "<= 1.20x", ratio <= 1.2))
    for point in curves["files"]:
        rows.append((f"B9 warm mount of {point['files']} files vs cp -al", human_seconds(point["warm-mount"]),
                     human_seconds(point["cp-al"]), point["ratio"], "<= 1.20x", point["ratio"] <= 1.2))
    return rows


def print_curves(curves):
    print("\nB9 scale curves (per item: / volume records, / cached models, / files)\n")
    header = ["volumes", "models", "start-up", "/record", "ls", "/record", "du", "/model", "gc", "/model", "mount",
              "unmount", "RSS"]
    lines = [header] + [[str(p["volumes"]), str(p["models"]), human_seconds(p["start-up"]),
                         human_seconds(p["start-up"] / p["volumes"]), human_seconds(p["ls"]),
                         human_seconds(p["ls"] / p["volumes"]), human_seconds(p["du"]),
                         human_seconds(p["du"] / p["models"]), human_seconds(p["gc"]),
                         human_seconds(p["gc"] / p["models"]), human_seconds(p["warm-mount"]),
                         human_seconds(p["unmount"]), f"{p['rss'] / MIB:.1f} MiB"]
                        for p in curves["state"]]
    lines += [[], ["files", "mount", "/file", "cp -al", "/file", "ratio", "RSS"]]
    lines += [[str(p["files"]), human_seconds(p["warm-mount"]), human_seconds(p["warm-mount"] / p["files"]),
               human_seconds(p["cp-al"]), human_seconds(p["cp-al"] / p["files"]), f"{p['ratio']:.2f}",
               f"{p['rss'] / MIB:.1f} MiB"] for p in curves["files"]]
    for line in lines:
        print("  ".join(cell.ljust(9) for cell in line))


def plot_curves(curves, path):
    """B9 as a picture (SVG, with matplotlib): cost per item against the size
    of the node's state; a flat line is cost that grows with the work."""
    import matplotlib
    matplotlib.use("svg")
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    state = curves["state"]
    sizes = [p["volumes"] for p in state]
    for key, label, per in [("start-up", "daemon start-up", "volumes"), ("ls", "ls", "volumes"),
                            ("du", "du", "models"), ("gc", "gc run", "models")]:
        left.plot(sizes, [p[key] / p[per] * 1e6 for p in state], marker="o",
                  label=f"{label} / {'record' if per == 'volumes' else 'model'}")
    for key, label in [("warm-mount", "warm mount"), ("unmount", "unmount")]:
        left.plot(sizes, [p[key] * 1e6 for p in state], marker="s", linestyle="--", label=f"{label} (whole)")
    left.set(xscale="log", yscale="log", xlabel="volume records (models: " + ", ".join(str(p["models"]) for p in state) + ")",
             ylabel="µs", title="Cost against the node's state")
    left.legend(fontsize=8)
    files = curves["files"]
    counts = [p["files"] for p in files]
    right.plot(counts, [p["warm-mount"] / p["files"] * 1e6 for p in files], marker="o", label="warm mount / file")
    right.plot(counts, [p["cp-al"] / p["files"] * 1e6 for p in files], marker="s", label="cp -al / file")
    right.set(xscale="log", yscale="log", xlabel="files in the model", ylabel="µs per file",
              title="Warm mount against cp -al")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
