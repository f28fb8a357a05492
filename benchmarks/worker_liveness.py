"""SIGSTOP a worker at a random moment, N times; print the time to the supervisor's 'worker unresponsive' line."""
import calendar, json, os, random, signal, socket, subprocess, sys, tempfile, threading, time

timeout = float(sys.argv[1]) if len(sys.argv) > 1 else 1.5
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 8

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
cfg.write(f'[server]\nworker_timeout = {timeout}\n[broker]\nurl = "redis://127.0.0.1:{free_port()}/0"\nreconnect_max = 2.0\n')
cfg.close()
env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY", "WATCHDOG", "LISTEN"))}
p = subprocess.Popen([sys.executable, "-m", "selectws", "serve", "--host", "127.0.0.1", "--port", "0", "--log-format",
                      "json", "--workers", "2", "--config", cfg.name], stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
recs, cond = [], threading.Condition()
def read():
    for raw in p.stderr:
        try: r = json.loads(raw)
        except ValueError: continue
        with cond: recs.append(r); cond.notify_all()
threading.Thread(target=read, daemon=True).start()

def wait(pred, t=30):
    end = time.monotonic() + t
    with cond:
        while True:
            for r in recs:
                if pred(r): return r
            assert time.monotonic() < end, "timeout"
            cond.wait(0.1)

def wall(r):
    w, _, f = r["timestamp"].rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(w, "%Y-%m-%dT%H:%M:%S")) + float("0." + f)

live = {}  # slot -> pid
wait(lambda r: r.get("event") == "workers ready")
for r in list(recs):
    if r.get("event") == "worker started": live[r["worker"]] = r["worker_pid"]
results = []
used = set(live.values())
try:
    for i in range(runs):
        slot = i % 2
        victim = live[slot]
        time.sleep(random.uniform(1.0, 2.0))  # a random phase against the beats
        t0 = time.time()
        os.kill(victim, signal.SIGSTOP)
        line = wait(lambda r: r.get("event") == "worker unresponsive; killing it" and r["worker_pid"] == victim)
        new = wait(lambda r: r.get("event") == "listening" and r.get("worker") == slot and r.get("pid") not in used)
        used.add(new["pid"])
        live[slot] = new["pid"]
        results.append(wall(line) - t0)
        print(f"run {i+1}: worker {slot} pid {victim}: SIGSTOP -> log line {results[-1]:.3f} s "
              f"(silent {line['silent']} s); replacement pid {new['pid']} listening {wall(new) - t0:.3f} s after SIGSTOP")
finally:
    p.send_signal(signal.SIGTERM)
    print("exit", p.wait(20))
    os.unlink(cfg.name)
print(f"worker_timeout={timeout}: n={len(results)} min={min(results):.3f} median={sorted(results)[len(results)//2]:.3f} max={max(results):.3f} s")
