#!/usr/bin/env python3
"""10,000 requests without a valid key (half none, half a wrong one), each with a 20 KB path,
from 4 keep-alive clients: how much does the governance database grow?
Usage: attack-anonymous-flood.py SERRANO_BIN PORT (serves the default model on a fresh database)."""
import socket, threading, collections, os, sys, time, subprocess
binary, port = sys.argv[1], int(sys.argv[2])
db = f"/tmp/flood-{port}/s.db"; os.makedirs(os.path.dirname(db), exist_ok=True)
for f in (db, db+"-wal", db+"-shm"):
    if os.path.exists(f): os.remove(f)
env = dict(os.environ, SERRANO_ADMIN_KEY="sk-srn-test-admin-key-0123456789abcdef")
srv = subprocess.Popen([binary, "serve", "--port", str(port), "--db", db], env=env, stderr=subprocess.DEVNULL)
time.sleep(8)
size = lambda: sum(os.path.getsize(f) for f in (db, db+"-wal") if os.path.exists(f))
before = size()
path = "/v1/" + "a" * 20000
res = collections.Counter()
def worker(bad):
    s = socket.create_connection(("127.0.0.1", port)); buf = b""
    auth = "Authorization: Bearer sk-srn-wrong-key-0000000000\r\n" if bad else ""
    req = f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    for i in range(2500):
        try:
            s.sendall(req)
            while b"\r\n\r\n" not in buf:
                d = s.recv(65536)
                if not d: raise Exception("EOF")
                buf += d
            head, rest = buf.split(b"\r\n\r\n", 1)
            cl = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
            while len(rest) < cl:
                d = s.recv(65536)
                if not d: raise Exception("EOF")
                rest += d
            res[head.split(b" ")[1].decode()] += 1; buf = rest[cl:]
        except Exception as e:
            res["error"] += 1; s = socket.create_connection(("127.0.0.1", port)); buf = b""
t0 = time.time()
ts = [threading.Thread(target=worker, args=(i % 2 == 1,)) for i in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
el = time.time() - t0
time.sleep(2)
print(f"{binary}: {dict(res)} in {el:.1f} s; database grew {size() - before} bytes")
srv.terminate(); srv.wait()
