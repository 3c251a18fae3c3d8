from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _doctor(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "doctor", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def test_doctor_names_each_missing_piece_with_its_fix(tmp_path: Path) -> None:
    (tmp_path / "loaders").mkdir()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[tftp]\nlisten = "127.0.0.1:{port}"\nroots = ["{tmp_path / "loaders"}"]\n'
                       '[dhcp]\nenabled = false\n[iscsi]\ndriver = "ctld"\n')
        r = _doctor(cfg)
    assert r.returncode == 1, r.stdout
    rows = {tuple(line.split()[:2]): line for line in r.stdout.splitlines()}
    # the default profile (compute) is iPXE: its loaders are needed, pxelinux's are not
    assert "MISSING" in rows[("tftp", "undionly.kpxe")] and "install ipxe" in rows[("tftp", "undionly.kpxe")]
    assert "MISSING" in rows[("tftp", "ipxe.efi")]
    assert "absent" in rows[("tftp", "pxelinux.0")] and "install pxelinux" in rows[("tftp", "pxelinux.0")]
    assert "MISSING" in rows[("tftp", "udp")] and "Address already in use" in rows[("tftp", "udp")]
    assert "MISSING" in rows[("export", "ctladm")]  # ctld was asked for, and this is Linux
    assert not any(k[0] == "dhcp" for k in rows)  # a disabled service needs nothing
    assert r.stdout.strip().endswith("needed piece(s) missing")


def test_doctor_passes_when_everything_needed_is_there(tmp_path: Path) -> None:
    loaders = tmp_path / "loaders"
    loaders.mkdir()
    for name in ("pxelinux.0", "ldlinux.c32"):
        (loaders / name).write_bytes(b"x")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[tftp]\nlisten = "127.0.0.1:0"\nroots = ["{loaders}"]\n[api]\nlisten = "127.0.0.1:0"\n'
                   '[dhcp]\nenabled = false\n[iscsi]\ndriver = "none"\n[boot]\ndefault_profile = "pxelinux-tftp"\n')
    r = _doctor(cfg)
    assert r.returncode == 0, r.stdout
    assert "all needed pieces are there" in r.stdout


def test_doctor_on_the_default_profile_needs_ipxe_and_an_api_listener_the_nodes_reach(tmp_path: Path) -> None:
    """compute fetches its script, kernel and initrd over HTTP from api.listen: 127.0.0.1 serves no node."""
    loaders = tmp_path / "loaders"
    loaders.mkdir()
    for name in ("undionly.kpxe", "ipxe.efi"):
        (loaders / name).write_bytes(b"x")
    base = f'[tftp]\nlisten = "127.0.0.1:0"\nroots = ["{loaders}"]\n[dhcp]\nenabled = false\n[iscsi]\ndriver = "none"\n'
    cfg = tmp_path / "c.toml"
    cfg.write_text(base + '[api]\nlisten = "127.0.0.1:0"\n')
    r = _doctor(cfg)
    assert r.returncode == 1, r.stdout
    row = next(line for line in r.stdout.splitlines() if line.startswith("http-boot"))
    assert "MISSING" in row and "api.listen" in row and "compute" in row, row
    cfg.write_text(base + '[api]\nlisten = "0.0.0.0:0"\n')
    r = _doctor(cfg)
    assert r.returncode == 0, r.stdout


def test_doctor_says_whether_the_native_tftp_pump_is_there(tmp_path: Path) -> None:
    """Built by make setup here: ok on auto; a config that asks for python does not look for it."""
    base = '[dhcp]\nenabled = false\n[iscsi]\ndriver = "none"\n[tftp]\nlisten = "127.0.0.1:0"\n'
    cfg = tmp_path / "c.toml"
    for engine, status in (("auto", "ok"), ("native", "ok"), ("python", "absent")):
        cfg.write_text(base + f'engine = "{engine}"\n')
        row = next(line for line in _doctor(cfg).stdout.splitlines() if line.startswith("tftp       native pump"))
        assert row.split()[3] == status, row


def test_doctor_names_a_missing_native_pump_when_the_config_asks_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance import doctor
    from bootfiles import tftp_native

    monkeypatch.setattr(tftp_native, "unavailable_reason", lambda: "bootfiles/native/libcellotftp.so is not built")
    needed = doctor._native_pump("native")
    assert (needed.ok, needed.needed) == (False, True)
    assert "is not built" in needed.fix and 'tftp.engine = "python"' in needed.fix
    auto = doctor._native_pump("auto")
    assert (auto.ok, auto.needed) == (False, False)  # auto serves from Python without it


def test_doctor_says_whether_a_postgresql_store_answers_and_what_serve_would_do(tmp_path: Path) -> None:
    from tests.pgserver import PgServer

    pg = PgServer.start()
    try:
        url = pg.create_database("cello")
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[appliance]\nstate_dir = "{tmp_path / "state"}"\n[store]\nurl = "{url}"\n'
                       '[fleet]\nname = "a"\n')

        def row() -> str:
            lines = [line for line in _doctor(cfg).stdout.splitlines() if line.startswith("store ")]
            assert len(lines) == 1, lines
            return lines[0]
        assert row().split()[:4] == ["store", "PostgreSQL", "answers", "ok"]
        pg.halt()
        down = row()
        assert "MISSING" in down and "store unreachable" in down and "cannot start until it answers" in down
        (tmp_path / "state").mkdir()
        (tmp_path / "state" / "boot-index.json").write_text("{}")
        assert "until then `cello serve` answers the nodes from" in row()
        # a diagnosis writes nothing: the database it reached was not migrated
        pg.resume()
        import psycopg

        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT to_regclass('cello_schema')").fetchone() == (None,)
    finally:
        pg.stop()


def _certificate(tmp: Path, days: int) -> tuple[Path, Path]:
    """A self-signed pair valid from two days ago for `days` days (0 or 1: expired by now)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "cello.test")])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / f"cert-{days}.pem", tmp / f"key-{days}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_doctor_checks_the_https_listeners_certificate(tmp_path: Path) -> None:
    base = (f'[appliance]\nstate_dir = "{tmp_path / "state"}"\n[tftp]\nenabled = false\n[dhcp]\nenabled = false\n'
            '[iscsi]\ndriver = "none"\n[boot]\ndefault_profile = "pxelinux-tftp"\n')
    cfg = tmp_path / "c.toml"
    expired, expired_key = _certificate(tmp_path, 1)
    good, good_key = _certificate(tmp_path, 30)
    rows: dict[str, str] = {}
    for api, ok, says in (("", True, ""),  # self-signed, made by the first start
                          (f'tls_cert = "{good}"\ntls_key = "{good_key}"', True, ""),
                          (f'tls_cert = "{expired}"\ntls_key = "{expired_key}"', False, "expired on"),
                          (f'tls_cert = "{good}"\ntls_key = "{expired_key}"', False, "not a PEM certificate and its"),
                          (f'tls_cert = "{good}"', False, "without api.tls_key")):
        cfg.write_text(base + f'[api]\nlisten = "127.0.0.1:0"\ntls_listen = "127.0.0.1:0"\n{api}\n')
        r = _doctor(cfg)
        rows = {" ".join(line.split()[:3]): line for line in r.stdout.splitlines()}
        row = rows["api TLS certificate"]
        assert ("ok" in row.split()[3]) == ok and says in row, r.stdout
        assert "api tcp 127.0.0.1:0" in rows
