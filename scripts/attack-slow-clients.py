#!/usr/bin/env python3
"""10,000 clients that send half a request line, then nothing: how many connections does the
server still hold 5 s later? Usage: attack-slow-clients.py SERRANO_BIN PORT [SERVER ARGS...]
(serves the default model on a fresh database; needs an open-file limit of 20,000)."""
import socket, subprocess, os, time, sys, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
binary, port, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
db = f"/tmp/slow-{port}/s.db"; os.makedirs(os.path.dirname(db), exist_ok=True)
env = dict(os.environ, SERRANO_ADMIN_KEY="sk-srn-test-admin-key-0123456789abcdef")
args = [binary, "serve", "--port", str(port), "--db", db] + extra
srv = subprocess.Popen(args, env=env, stderr=subprocess.DEVNULL)
time.sleep(8)
conns = []
for i in range(10000):
    s = socket.create_connection(("127.0.0.1", port)); s.sendall(b"POST /v1/chat/compl"); conns.append(s)
time.sleep(5)
open_ = 0
for s in conns:
    s.setblocking(False)
    try:
        d = s.recv(1)
        if d == b"": continue
        open_ += 1
    except BlockingIOError: open_ += 1
    except ConnectionResetError: pass
print(f"{binary}: {open_} of 10000 slow connections still open 5 s after they stopped sending")
# A server that waits for its connections on SIGTERM would wait for ever: kill it.
srv.kill(); srv.wait()
