# bulwark-lab-probe tls-reject HOST PORT CA [CERT KEY]
#
# Exit 0 when the TLS server at HOST:PORT refuses us: the handshake fails, or (TLS 1.3, where
# the server judges a client certificate after the client's handshake is done) the first read
# ends in an alert or a close. Exit 1 when the connection is accepted (the server answers or
# waits for our first frame), 2 when TCP does not connect at all. Installed in the VM tests.
import socket
import ssl
import sys


def main(argv):
    if len(argv) not in (5, 7) or argv[1] != "tls-reject":
        sys.exit("usage: bulwark-lab-probe tls-reject HOST PORT CA [CERT KEY]")
    host, port, ca = argv[2], int(argv[3]), argv[4]
    ctx = ssl.create_default_context(cafile=ca)
    if len(argv) == 7:
        ctx.load_cert_chain(argv[5], argv[6])
    try:
        raw = socket.create_connection((host, port), timeout=5)
    except OSError as e:
        print(f"closed: {e}")
        return 2
    try:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.settimeout(3)
            try:
                data = tls.recv(1)
            except socket.timeout:
                print("accepted: the server waits for our first frame")
                return 1
            if data:
                print("accepted: the server sent data")
                return 1
            print("tls-reject: the server closed the connection after the handshake")
            return 0
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
        print(f"tls-reject: {e}")
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
