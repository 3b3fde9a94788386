"""A minimal RIS HL7 listener (MLLP) that acknowledges and records result messages.

A stand-in for the hospital's RIS, which no Debian package provides; the node's side (the
hl7 library's MLLP client, message building, ACK checking) is the real code under test.
"""

from __future__ import annotations

import socketserver
import threading

import hl7

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"


class Ris:
    def __init__(self, port: int, answer: str = "AA") -> None:
        self.port = port
        self.answer = answer
        self.messages: list[hl7.Message] = []
        ris = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data = b""
                while not data.endswith(EB + CR):
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                message = hl7.parse(data.strip(SB + EB + CR).decode())
                ris.messages.append(message)
                control = str(message.segment("MSH")[10])
                ack = f"MSH|^~\\&|RIS||NODE||20260101000000||ACK^R01|A{control}|P|2.5.1\rMSA|{ris.answer}|{control}|ok"
                self.request.sendall(SB + ack.encode() + EB + CR)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "Ris":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
