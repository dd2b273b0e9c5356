#!/usr/bin/env python3
"""Time to first output and total of one lode command, and the bytes the agent fetched
for it, with a fresh agent (empty state directory and caches) and the host page cache
dropped. Needs root and LODE_HOME (with the image in its store); it deletes
$LODE_HOME/agent before each run, so use a scratch LODE_HOME.

  LODE_HOME=... scripts/vm-start-time.py vm run python -- python3 -c "print(1)"
  LODE_HOME=... scripts/vm-start-time.py -q run python -- python3 -c "print(1)"
"""
import json, os, shutil, subprocess, sys, time
L = os.environ.get("LODE", "target/debug/lode")
home = os.environ["LODE_HOME"]
state = os.path.join(home, "agent")
def fresh_agent():
    subprocess.run(["umount", "-l", os.path.join(state, "files")], stderr=subprocess.DEVNULL)
    shutil.rmtree(state, ignore_errors=True)
    a = subprocess.Popen([L, "agent"], stdout=open(os.path.join(home, "agent.log"), "w"), stderr=subprocess.STDOUT)
    for _ in range(300):
        if subprocess.run([L, "ls"], capture_output=True).returncode == 0:
            return a
        time.sleep(0.05)
    raise SystemExit("agent did not start")
def origin_bytes():
    s = json.loads(subprocess.run([L, "--json", "stats"], capture_output=True, check=True).stdout)
    return sum(t["bytes"] for t in s["tiers"] if t["name"] in ("origin", "az"))
args = sys.argv[1:]
agent = fresh_agent()
try:
    subprocess.run(["sync"]); open("/proc/sys/vm/drop_caches", "w").write("3\n")
    before = origin_bytes()
    t0 = time.monotonic()
    p = subprocess.Popen([L] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.read(1)
    t_first = time.monotonic() - t0
    rest = p.stdout.read()
    err = p.stderr.read()
    rc = p.wait()
    total = time.monotonic() - t0
    fetched = origin_bytes() - before
    print(json.dumps({"cmd": " ".join(args), "rc": rc, "output": (first + rest).decode(errors="replace"),
        "first_output_s": round(t_first, 3), "total_s": round(total, 3),
        "fetched_bytes": fetched, "fetched_mib": round(fetched / 2**20, 1)}))
    sys.stderr.write(err.decode(errors="replace"))
finally:
    agent.terminate(); agent.wait()
    subprocess.run(["umount", "-l", os.path.join(state, "files")], stderr=subprocess.DEVNULL)
