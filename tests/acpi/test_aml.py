"""The AML encoder and the resource descriptors: property tests against the independent decoder in
acpi_helpers, and byte-for-byte comparison with what the real iasl compiles from the same ASL."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcihole.acpi import aml
from pcihole.acpi.resources import (
    dword_memory,
    memory32_fixed,
    qword_memory,
    resource_template,
    word_bus_number,
)
from tests.acpi.acpi_helpers import (
    byte_sum,
    decode_eisa_id,
    decode_integer,
    decode_pkg_length,
    needs_iasl,
    run_iasl,
)

U64 = st.integers(0, (1 << 64) - 1)
#: Values around each encoding's edges, where an off-by-one would show.
EDGES = st.sampled_from(
    [0, 1, 2, 0xFE, 0xFF, 0x100, 0xFFFF, 0x10000, 0xFFFFFFFF, 1 << 32, (1 << 64) - 2, (1 << 64) - 1]
)


def shortest_integer_size(value: int) -> int:
    if value in (0, 1, (1 << 64) - 1):
        return 1
    return 1 + next(n for n in (1, 2, 4, 8) if value < 1 << (8 * n))


@given(st.one_of(U64, EDGES))
def test_integer_round_trips_in_its_shortest_form(value):
    encoded = aml.integer(value)
    assert decode_integer(encoded, 0) == (value, len(encoded))
    assert len(encoded) == shortest_integer_size(value)


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_integer_out_of_range(value):
    with pytest.raises(aml.AmlError, match="64 bits"):
        aml.integer(value)


@given(
    st.one_of(
        st.integers(0, aml.MAX_PKG_LENGTH - 4), st.sampled_from([0, 61, 62, 63, 64, 0xFFC, 0xFFD, 0xFFE])
    )
)
def test_pkg_length_counts_itself_and_is_shortest(body):
    encoded = aml.pkg_length(body)
    value, size = decode_pkg_length(encoded + b"\0" * 4, 0)
    assert size == len(encoded)
    assert value == body + size  # §20.2.4: the length includes the PkgLength bytes
    # No shorter encoding could hold it: 1 byte holds up to 63, n+1 bytes up to 2**(4+8n) - 1.
    limits = [0x3F, (1 << 12) - 1, (1 << 20) - 1, (1 << 28) - 1]
    assert value <= limits[size - 1]
    assert size == 1 or body + size - 1 > limits[size - 2]


@pytest.mark.parametrize(
    ("body", "encoded"),
    [
        (0, b"\x01"),
        (62, b"\x3f"),  # 63 fits one byte
        (63, b"\x41\x04"),  # 65 = 0x41: lead 0x40 | 1, follow byte 0x04
        (0xFFD, b"\x4f\xff"),  # 0xFFF, the largest two-byte value
        (0xFFE, b"\x81\x00\x01"),  # 0x1001 needs three bytes
    ],
)
def test_pkg_length_known_encodings(body, encoded):
    assert aml.pkg_length(body) == encoded


def test_pkg_length_limits():
    with pytest.raises(aml.AmlError):
        aml.pkg_length(-1)
    with pytest.raises(aml.AmlError, match="maximum"):
        aml.pkg_length(aml.MAX_PKG_LENGTH)  # + 4 bytes of PkgLength exceeds 2**28 - 1


@given(st.binary(max_size=5000))
def test_buffer_length_covers_size_and_bytes(data):
    encoded = aml.buffer(data)
    assert encoded[0] == aml.BUFFER_OP
    length, n = decode_pkg_length(encoded, 1)
    size, m = decode_integer(encoded, 1 + n)
    assert size == len(data)
    assert length == len(encoded) - 1  # everything after the opcode
    assert encoded[1 + n + m :] == data


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=40))
def test_device_and_scope_packages_cover_their_terms(terms):
    for encoded, opcode in ((aml.device("DEV0", terms), b"\x5b\x82"), (aml.scope("\\_SB", terms), b"\x10")):
        assert encoded.startswith(opcode)
        length, n = decode_pkg_length(encoded, len(opcode))
        assert length == len(encoded) - len(opcode)
        rest = encoded[len(opcode) + n :]
        name = b"DEV0" if opcode == b"\x5b\x82" else b"\\_SB_"
        assert rest == name + b"".join(terms)


def test_package_counts_elements():
    encoded = aml.package([aml.integer(5), aml.integer(0), aml.integer(0), aml.integer(0)])
    assert encoded == bytes([0x12, 0x07, 0x04, 0x0A, 0x05, 0x00, 0x00, 0x00])
    with pytest.raises(aml.AmlError, match="255"):
        aml.package([aml.integer(0)] * 256)


@pytest.mark.parametrize(
    ("path", "encoded"),
    [
        ("_CRS", b"_CRS"),
        ("_SB", b"_SB_"),
        ("\\_S5", b"\\_S5_"),
        ("\\_SB.PCI0", b"\\\x2e_SB_PCI0"),
        ("\\_SB.PCI0.RES0", b"\\\x2f\x03_SB_PCI0RES0"),
        ("^MBRD", b"^MBRD"),
        ("\\", b"\\\x00"),
    ],
)
def test_name_strings(path, encoded):
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("bad", ["0ABC", "ABCDE", "pci0", "A-B", ""])
def test_bad_name_segments(bad):
    with pytest.raises(aml.AmlError):
        aml.name_seg(bad)


@pytest.mark.parametrize(
    ("text", "value"),
    [("PNP0A08", 0x080AD041), ("PNP0A03", 0x030AD041), ("PNP0C02", 0x020CD041), ("PNP0501", 0x0105D041)],
)
def test_eisa_id_known_values(text, value):
    assert aml.eisa_id(text) == value


@given(st.from_regex(r"[A-Z]{3}[0-9A-F]{4}", fullmatch=True))
def test_eisa_id_round_trips(text):
    value = aml.eisa_id(text)
    assert 0 <= value < 1 << 32
    assert value & 0x80 == 0  # bit 7 of the first byte is reserved, zero
    assert decode_eisa_id(value) == text


@pytest.mark.parametrize("bad", ["pnp0a08", "PNP0A0", "PNP0G08", "P1P0A08"])
def test_bad_eisa_ids(bad):
    with pytest.raises(aml.AmlError):
        aml.eisa_id(bad)


def test_resource_template_end_tag_checksum():
    encoded = resource_template([word_bus_number(0, 255), memory32_fixed(0xE0000000, 0x10000000)])
    length, n = decode_pkg_length(encoded, 1)
    size, m = decode_integer(encoded, 1 + n)
    data = encoded[1 + n + m :]
    assert len(data) == size == 16 + 12 + 2
    assert data[-2] == 0x79
    assert byte_sum(data) == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda: word_bus_number(5, 4),
        lambda: word_bus_number(0, 0x10000),
        lambda: dword_memory(0, 0xFFFFFFFF),  # length 2**32 does not fit a DWORD
        lambda: dword_memory(0xC0000000, 0x1_0000_0000),
        lambda: memory32_fixed(0xF0000000, 0x20000000),
        lambda: qword_memory(0, (1 << 64) - 1),
    ],
)
def test_descriptors_refuse_what_does_not_fit(call):
    with pytest.raises(ValueError):
        call()


@needs_iasl
def test_descriptors_match_what_iasl_compiles(tmp_path):
    """The same ResourceTemplate written in ASL and compiled by iasl gives the same descriptor bytes
    (the end tag's checksum aside: iasl writes 0 there, which the spec also allows)."""
    asl = """DefinitionBlock ("", "SSDT", 2, "PCIHOL", "RESTEST", 1)
{
    Name (RES0, ResourceTemplate ()
    {
        WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, 0x10, 0x1F, 0, 0x10)
        DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
            0, 0xC0000000, 0xDFFFFFFF, 0, 0x20000000)
        QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
            0, 0x8000000000, 0xFFFFFFFFFF, 0, 0x8000000000)
        QWordMemory (ResourceConsumer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
            0, 0xFFF00000, 0x10FEFFFFF, 0, 0x10000000)
        Memory32Fixed (ReadWrite, 0xE0000000, 0x10000000)
    })
}
"""
    (tmp_path / "res.asl").write_text(asl)
    run_iasl(tmp_path, "-p", "res", "res.asl")
    compiled = (tmp_path / "res.aml").read_bytes()[36:]
    ours = aml.name(
        "RES0",
        resource_template(
            [
                word_bus_number(0x10, 0x1F),
                dword_memory(0xC0000000, 0xDFFFFFFF),
                qword_memory(0x80_0000_0000, 0xFF_FFFF_FFFF),
                qword_memory(0xFFF00000, 0x10FEFFFFF, producer=False),
                memory32_fixed(0xE0000000, 0x10000000),
            ]
        ),
    )
    assert ours[:-1] == compiled[:-1]
    assert compiled[-2:] == b"\x79\x00"
