"""Machine files: the embedded default, the schema, and one clear error per problem.

(Lives in tests/pci because the machine-file loader builds PCI topologies; move to tests/machine/ freely.)
"""

import textwrap

import pytest

from pcihole.machine import machinefile
from pcihole.machine.machinefile import MachineFileError
from pcihole.pci.host_bridge import HostBridge

MINIMAL = """
[machine]
ram_mib = 64

[[segment]]
id = 0
ecam_base = 0xe0000000
"""


def load_text(tmp_path, text, name="machine.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return machinefile.load(path)


def error(tmp_path, text, name="machine.toml"):
    with pytest.raises(MachineFileError) as raised:
        load_text(tmp_path, text, name)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / name) + ": ")
    return message[len(str(tmp_path / name)) + 2 :]


def test_default_machine_is_realistic():
    m = machinefile.load_default()
    assert m.ram_mib == 64 and m.ram_bytes == 64 << 20
    (segment,) = m.segments
    assert (segment.id, segment.ecam_base, segment.start_bus, segment.end_bus) == (0, 0xE0000000, 0, 255)
    assert (segment.window_base, segment.window_size) == (0xE0000000, 256 << 20)
    assert segment.window_last < 1 << 32
    devices = {str(d.bdf): d for d in HostBridge(m.topology).devices()}
    ports = [d for d in devices.values() if d.kind == "root port"]
    assert 3 <= len(ports) <= 4
    assert all(
        (d.vendor, d.device, d.class_code, d.header_type) == (0x1B36, 0x000C, 0x060400, 1) for d in ports
    )
    ids = {(d.vendor, d.device, d.class_code) for d in devices.values()}
    assert {(0x1AF4, 0x1041, 0x020000), (0x1AF4, 0x1042, 0x010000), (0x1B36, 0x0010, 0x010802)} <= ids
    assert any(d.multifunction and d.kind == "endpoint" for d in devices.values())
    assert devices["0000:00:00.0"].kind == "host bridge"


def test_minimal_machine_and_defaults(tmp_path):
    m = load_text(tmp_path, MINIMAL)
    (segment,) = m.segments
    assert (segment.fill, segment.writes, segment.start_bus, segment.end_bus) == (0xFF, "discard", 0, 255)
    assert m.topology.root_ports == () and m.topology.endpoints == ()


def test_full_schema_round_trip(tmp_path):
    m = load_text(
        tmp_path,
        MINIMAL.replace(
            "ecam_base = 0xe0000000", 'ecam_base = 0xe0000000\nbuses = "0-63"\nfill = 0\nwrites = "trap"'
        )
        + """
[[segment]]
id = 1
ecam_base = 0xd0000000
buses = "0-15"

[[root_port]]
bdf = "0000:00:02.0"
secondary = 1
subordinate = 2
slot = 7
vendor = 0x8086
device = 0x29c1
name = "rp"

[[endpoint]]
bdf = "0000:01:00.0"
vendor = 0x1af4
device = 0x1041
class = 0x020000
revision = 1
subsystem_vendor = 0x1234
subsystem = 0x5678
name = "nic"
[[endpoint.bar]]
index = 4
type = "mem64"
size = 0x4000
prefetchable = true

[[endpoint]]
bdf = "0001:00:03.0"
vendor = 0x8086
device = 0x2922
class = 0x010601
""",
    )
    seg0, seg1 = m.segments
    assert (seg0.end_bus, seg0.fill, seg0.writes) == (63, 0, "trap")
    assert (seg1.id, seg1.ecam_base, seg1.end_bus) == (1, 0xD0000000, 15)
    (port,) = m.topology.root_ports
    assert (port.secondary, port.subordinate, port.slot_number, port.vendor, port.device, port.name) == (
        1,
        2,
        7,
        0x8086,
        0x29C1,
        "rp",
    )
    nic, ahci = m.topology.endpoints
    assert (nic.revision, nic.subsystem_vendor, nic.subsystem, nic.name) == (1, 0x1234, 0x5678, "nic")
    assert [(b.index, b.kind, b.size, b.prefetchable) for b in nic.bars] == [(4, "mem64", 0x4000, True)]
    assert str(ahci.bdf) == "0001:00:03.0"


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            '[[endpoint]]\nbdf = "0000:05:00.0"\nvendor = 0x1af4\ndevice = 0x1041\nclass = 0x020000\n',
            "endpoint 0000:05:00.0: bus 5 is reached by no bridge",
        ),
        (
            '[[endpoint]]\nbdf = "0000:00:00.0"\nvendor = 0x1af4\ndevice = 0x1041\nclass = 0x020000\n',
            "endpoint 0000:00:00.0: duplicate BDF, 0000:00:00.0 is already the host bridge",
        ),
        (
            '[[segment]]\nid = 1\necam_base = 0xe0000000\nbuses = "0-15"\n',
            "segment 1: ECAM window [0xe0000000, 0xe0ffffff] overlaps segment 0's",
        ),
        ('[[segment]]\nid = 1\necam_base = 0x100000000\nbuses = "0-15"\n', "segment 1: ECAM window"),
        (
            "[[segment]]\nid = 1\necam_base = 0xd0080000\n",
            "segment 1: ecam_base 0xd0080000 is not aligned to 256 MiB",
        ),
        ('[[segment]]\nid = 1\necam_base = 0xd0000000\nbuses = "0-300"\n', "segment 1: buses '0-300'"),
        (
            "[[segment]]\nid = 1\necam_base = 0xd0000000\nbuses = 255\n",
            "segment 1: buses must be a string, not integer",
        ),
        (
            '[[segment]]\nid = 1\necam_base = 0xd0000000\nwrites = "drop"\n',
            "segment 1: writes 'drop' is not one of",
        ),
        (
            '[[segment]]\nid = 1\necam_base = "0xd0000000"\n',
            "segment 1: ecam_base must be an integer, not string",
        ),
        (
            "[[segment]]\nid = true\necam_base = 0xd0000000\n",
            "segment #2: id must be an integer, not boolean",
        ),
        ("[[segment]]\nid = 1\necam_base = 0xd0000000\nbase = 1\n", "segment 1: unknown key 'base'"),
        ("[[segment]]\necam_base = 0xd0000000\n", "segment #2: missing key 'id'"),
        ('[[root_port]]\nbdf = "0000:00:02.0"\n', "root port 0000:00:02.0: missing key 'secondary'"),
        ('[[root_port]]\nbdf = "00:02.0"\nsecondary = 1\n', "root port #1: bdf '00:02.0' is not a BDF"),
        (
            '[[root_port]]\nbdf = "0000:00:02.0"\nsecondary = 1\nchassis = 1\n',
            "root port 0000:00:02.0: unknown key 'chassis'",
        ),
        (
            '[[endpoint]]\nbdf = "0000:00:03.0"\nvendor = 0x1af4\ndevice = 0x1041\nclass = 0x020000\nvender = 1\n',
            "endpoint 0000:00:03.0: unknown key 'vender'",
        ),
        (
            '[[endpoint]]\nbdf = "0000:00:03.0"\nvendor = 0x1af4\ndevice = 0x1041\nclass = 0x020000\n'
            '[[endpoint.bar]]\nindex = 0\ntype = "mem32"\nsize = 4096\nalign = 1\n',
            "endpoint 0000:00:03.0: bar #1: unknown key 'align'",
        ),
        (
            '[[endpoint]]\nbdf = "0000:00:03.0"\nvendor = 0x1af4\ndevice = 0x1041\nclass = 0x020000\n'
            '[[endpoint.bar]]\nindex = 0\ntype = "mem32"\nsize = 4096\nprefetchable = "yes"\n',
            "endpoint 0000:00:03.0: bar #1: prefetchable must be a boolean, not string",
        ),
        (
            '[[endpoint]]\nbdf = "0000:00:03.0"\nvendor = 0x1af4\ndevice = 0x1041\n',
            "endpoint 0000:00:03.0: missing key 'class'",
        ),
        ("[extra]\nx = 1\n", "unknown top-level key 'extra'"),
    ],
)
def test_one_clear_error_per_problem(tmp_path, extra, message):
    got = error(tmp_path, MINIMAL + extra)
    assert message in got


def test_top_level_keys_must_be_arrays_of_tables(tmp_path):
    assert error(tmp_path, "endpoint = 3\n" + MINIMAL) == (
        "endpoint must be an array of tables ([[endpoint]]), not integer"
    )
    assert error(
        tmp_path, "segment = 3\n" + MINIMAL.replace("[[segment]]\nid = 0\necam_base = 0xe0000000\n", "")
    ) == ("segment must be an array of tables ([[segment]]), not integer")


def test_machine_table_errors(tmp_path):
    assert (
        error(tmp_path, MINIMAL.replace("ram_mib = 64", "ram_mib = 0"))
        == "[machine]: ram_mib 0 must be at least 1"
    )
    assert error(tmp_path, MINIMAL.replace("ram_mib = 64", 'ram_mib = "64"')) == (
        "[machine]: ram_mib must be an integer, not string"
    )
    assert "unknown key 'cpus'" in error(tmp_path, MINIMAL.replace("ram_mib = 64", "ram_mib = 64\ncpus = 2"))
    assert error(tmp_path, MINIMAL.replace("[machine]\nram_mib = 64\n", "")) == "missing table [machine]"
    assert "no [[segment]]" in error(tmp_path, "[machine]\nram_mib = 64\n")


def test_invalid_toml_names_the_file(tmp_path):
    assert error(tmp_path, "[machine\n").startswith("invalid TOML:")


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        machinefile.load(tmp_path / "nope.toml")
