//! A certificate's distinguished name as GnuTLS's `gnutls_x509_crt_get_dn()`
//! prints it, because that string is what QEMU's `tls-authz` objects match.
//!
//! Learned from qemu-storage-daemon's "authz check for ... is denied" lines:
//! RDNs in certificate order (`C=GB,O=Example,CN=client-one`, the reverse of
//! RFC 4514 order), multi-valued RDNs joined with `+` in stored order, the
//! RFC 4514 backslash escapes (`,+"\<>;`, a leading `#` or space, a trailing
//! space), GnuTLS's attribute names (`EMAIL`, `surName`, ...), and any other
//! attribute (telephoneNumber, unknown OIDs) as `#` + the hex of its DER.

use x509_parser::prelude::{FromDer, X509Certificate, X509Name};
use x509_parser::x509::AttributeTypeAndValue;

use super::HandshakeError;

/// The subject DN of a DER certificate.
pub fn dn_of_certificate(der: &[u8]) -> Result<String, HandshakeError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| HandshakeError::BadPeerCertificate(e.to_string()))?;
    Ok(gnutls_dn(cert.subject()))
}

/// Formats a name the GnuTLS way.
pub fn gnutls_dn(name: &X509Name<'_>) -> String {
    name.iter()
        .map(|rdn| rdn.iter().map(attribute).collect::<Vec<_>>().join("+"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Attribute names GnuTLS prints as text, by OID.
const TEXT_ATTRIBUTES: &[(&str, &str)] = &[
    ("2.5.4.3", "CN"),
    ("2.5.4.4", "surName"),
    ("2.5.4.5", "serialNumber"),
    ("2.5.4.6", "C"),
    ("2.5.4.7", "L"),
    ("2.5.4.8", "ST"),
    ("2.5.4.9", "street"),
    ("2.5.4.10", "O"),
    ("2.5.4.11", "OU"),
    ("2.5.4.12", "title"),
    ("2.5.4.13", "description"),
    ("2.5.4.17", "postalCode"),
    ("2.5.4.41", "name"),
    ("2.5.4.42", "givenName"),
    ("2.5.4.43", "initials"),
    ("2.5.4.44", "generationQualifier"),
    ("2.5.4.46", "dnQualifier"),
    ("2.5.4.65", "pseudonym"),
    ("0.9.2342.19200300.100.1.1", "UID"),
    ("0.9.2342.19200300.100.1.25", "DC"),
    ("1.2.840.113549.1.9.1", "EMAIL"),
];

/// Names GnuTLS knows but prints as hex.
const HEX_ATTRIBUTES: &[(&str, &str)] = &[("2.5.4.20", "telephoneNumber")];

fn attribute(a: &AttributeTypeAndValue<'_>) -> String {
    let oid = a.attr_type().to_id_string();
    if let Some((_, name)) = TEXT_ATTRIBUTES.iter().find(|(o, _)| *o == oid) {
        if let Ok(text) = a.as_str() {
            return format!("{name}={}", escape(text));
        }
    }
    let name = HEX_ATTRIBUTES
        .iter()
        .chain(TEXT_ATTRIBUTES)
        .find(|(o, _)| *o == oid)
        .map_or(oid.as_str(), |(_, n)| n);
    format!("{name}=#{}", hex_der(a))
}

/// RFC 4514 escaping, as GnuTLS applies it.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The value's whole DER encoding (tag, length, contents) in lowercase hex.
fn hex_der(a: &AttributeTypeAndValue<'_>) -> String {
    let value = a.attr_value();
    let header = &value.header;
    let data = value.data;
    let mut der = Vec::with_capacity(data.len() + 6);
    let class = (header.class() as u8) << 6;
    let constructed = if header.is_constructed() { 0x20 } else { 0 };
    der.push(class | constructed | (header.tag().0 as u8 & 0x1f));
    match data.len() {
        n if n < 0x80 => der.push(n as u8),
        n if n <= 0xff => der.extend([0x81, n as u8]),
        n => der.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    der.extend_from_slice(data);
    der.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    /// The expected strings are what qemu-storage-daemon 10.0.2 (GnuTLS) printed in its
    /// "TLS x509 authz check for ... is denied" line for these same certificates.
    fn dn_of_pem(pem: &str) -> String {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        dn_of_certificate(der.as_ref()).unwrap()
    }

    #[test]
    fn test_dn_escapes_like_gnutls() {
        assert_eq!(
            dn_of_pem(include_str!("testdata/escaped-dn.pem")),
            r#"C=GB,O=Acme\, Inc.,OU=x\+y,CN=\#two \"q\" \;\<\>=\\\ "#
        );
    }

    #[test]
    fn test_dn_multi_valued_rdn_and_email() {
        assert_eq!(
            dn_of_pem(include_str!("testdata/multi-valued-rdn.pem")),
            "C=GB,O=Example,CN=multi+UID=b,EMAIL=a@b.c"
        );
    }

    #[test]
    fn test_dn_attribute_names_like_gnutls() {
        assert_eq!(
            dn_of_pem(include_str!("testdata/many-attributes.pem")),
            "DC=org,DC=ex,C=GB,ST=Sx,L=Ldn,street=1 Rd,postalCode=N1,O=Ex,OU=U,title=T,\
             surName=Sur,givenName=Giv,initials=I,generationQualifier=Jr,dnQualifier=dq,\
             pseudonym=ps,serialNumber=42,name=nm,description=de,telephoneNumber=#0c023132,\
             CN=c,UID=u,EMAIL=e@x"
        );
    }

    #[test]
    fn test_garbage_certificate_is_an_error_not_a_panic() {
        assert!(dn_of_certificate(b"\x30\x03\x02\x01").is_err());
        assert!(dn_of_certificate(b"").is_err());
    }

    #[test]
    fn test_escape_specials_and_edges() {
        assert_eq!(escape("Example, Inc"), "Example\\, Inc");
        assert_eq!(escape("x+y"), "x\\+y");
        assert_eq!(
            escape("#two \"q\" ;<>=\\ "),
            "\\#two \\\"q\\\" \\;\\<\\>=\\\\\\ "
        );
        assert_eq!(escape(" lead"), "\\ lead");
        assert_eq!(escape(""), "");
    }
}
