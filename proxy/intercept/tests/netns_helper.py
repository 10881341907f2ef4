"""Sockets for tests/netns.rs, run inside the test's network namespaces with `ip netns exec`.

serve NAME HOST:PORT...   listen on each address; answer every connection with one line
                          "NAME <original destination>" (SO_ORIGINAL_DST when the connection was
                          redirected by iptables, else the address it reached) and close.
                          Prints "ready" once all are bound; runs until killed.
connect HOST PORT [UID]   connect (as UID when given) within 1 s, print the line received or
                          "ERR <reason>".
"""
import os
import socket
import struct
import sys
import threading

SO_ORIGINAL_DST = 80


def original_destination(conn):
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, addr = struct.unpack("!2xH4s8x", raw)
        return "%s:%d" % (socket.inet_ntoa(addr), port)
    except OSError:
        host, port = conn.getsockname()[:2]
        return "%s:%d" % (host, port)


def serve(name, addresses):
    listeners = []
    for address in addresses:
        host, port = address.rsplit(":", 1)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, int(port)))
        s.listen(16)
        listeners.append(s)

    def loop(s):
        while True:
            conn, _ = s.accept()
            conn.sendall(("%s %s\n" % (name, original_destination(conn))).encode())
            conn.close()

    for s in listeners:
        threading.Thread(target=loop, args=(s,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


def connect(host, port, uid=None):
    if uid is not None:
        os.setgid(int(uid))
        os.setuid(int(uid))
    try:
        s = socket.create_connection((host, int(port)), timeout=1)
        print(s.makefile().readline().strip())
    except OSError as e:
        print("ERR %s" % e)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3:])
    else:
        connect(*sys.argv[2:])
