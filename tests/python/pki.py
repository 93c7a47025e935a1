"""Throwaway certificates for the tests, made with the `openssl` command in a temp dir: a CA, and leaf
certificates it signs (servers for localhost, clients with a SPIFFE URI SAN)."""

import subprocess

EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory, name="ca"):
    """`<name>.pem` and `<name>.key`: a CA valid for a day."""
    openssl(
        "req", "-x509", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1",
        "-subj", "/CN=eventhub-gateway python test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )


def issue(directory, name, subject, alt_names, usage, ca="ca"):
    """`<name>.pem` and `<name>.key`, signed by `ca`: `alt_names` like `DNS:localhost` or `URI:spiffe://...`,
    `usage` `serverAuth` or `clientAuth`."""
    openssl("req", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=directory)
    lines = [
        "basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature", f"extendedKeyUsage={usage}",
        "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid",
    ]
    if alt_names:
        lines.append("subjectAltName=" + ",".join(alt_names))
    (directory / f"{name}.ext").write_text("\n".join(lines) + "\n")
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext",
        cwd=directory,
    )
