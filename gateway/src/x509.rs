//! Just enough X.509 (DER) to name a client certificate's holder: the
//! subject's common name and the subject-alternative-name DNS names, URIs
//! (SPIFFE IDs) and e-mail addresses. The certificate was already verified
//! by rustls; this only reads it.

/// A DER element: (tag, content, rest).
fn element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, b) = b.split_first()?;
    let (len, b) = if first < 0x80 {
        (first as usize, b)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |acc, &x| (acc << 8) | x as usize);
        (len, &b[n..])
    };
    if b.len() < len {
        return None;
    }
    Some((tag, &b[..len], &b[len..]))
}

/// The elements of a constructed value, in order.
fn children(mut b: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while let Some((tag, content, rest)) = element(b) {
        out.push((tag, content));
        b = rest;
    }
    out
}

const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];

/// Who a certificate names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subject {
    pub common_name: Option<String>,
    pub dns: Vec<String>,
    pub uris: Vec<String>,
    pub emails: Vec<String>,
}

impl Subject {
    /// The most specific name: a URI SAN (SPIFFE ID), else a DNS SAN, else
    /// an e-mail SAN, else the common name.
    pub fn primary(&self) -> Option<&str> {
        self.uris
            .first()
            .or(self.dns.first())
            .or(self.emails.first())
            .or(self.common_name.as_ref())
            .map(String::as_str)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.uris
            .iter()
            .chain(&self.dns)
            .chain(&self.emails)
            .chain(self.common_name.iter())
            .map(String::as_str)
    }
}

/// Read the subject CN and SANs of a DER certificate; `None` when it isn't one.
pub fn subject(der: &[u8]) -> Option<Subject> {
    let (0x30, cert, _) = element(der)? else {
        return None;
    };
    let (0x30, tbs, _) = element(cert)? else {
        return None;
    };
    let fields = children(tbs);
    // [0] version is optional; then serial, signature, issuer, validity, subject.
    let skip = usize::from(fields.first()?.0 == 0xa0);
    let subject_name = fields.get(skip + 4)?;
    let mut s = Subject::default();
    for (tag, set) in children(subject_name.1) {
        if tag != 0x31 {
            continue;
        }
        for (_, atv) in children(set) {
            let kv = children(atv);
            if let [(0x06, oid), (_, value)] = kv.as_slice() {
                if *oid == OID_CN {
                    s.common_name = std::str::from_utf8(value).ok().map(String::from);
                }
            }
        }
    }
    // Extensions: [3] { SEQUENCE { SEQUENCE { OID, [critical], OCTET STRING } } }
    if let Some((_, ext)) = fields.iter().find(|(t, _)| *t == 0xa3) {
        let (_, list, _) = element(ext)?;
        for (_, e) in children(list) {
            let parts = children(e);
            let Some((0x06, oid)) = parts.first() else {
                continue;
            };
            if *oid != OID_SAN {
                continue;
            }
            let Some((0x04, octets)) = parts.last() else {
                continue;
            };
            let (0x30, names, _) = element(octets)? else {
                continue;
            };
            for (tag, v) in children(names) {
                let Ok(v) = std::str::from_utf8(v) else {
                    continue;
                };
                match tag {
                    0x81 => s.emails.push(v.into()),
                    0x82 => s.dns.push(v.into()),
                    0x86 => s.uris.push(v.into()),
                    _ => {}
                }
            }
        }
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cn_and_sans_from_a_real_certificate() {
        let mut p = rcgen::CertificateParams::new(vec!["svc-a.internal".to_string()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "svc-a");
        p.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::Ia5String::try_from("spiffe://prod/ns/a/sa/svc-a").unwrap(),
        ));
        p.subject_alt_names.push(rcgen::SanType::Rfc822Name(
            rcgen::Ia5String::try_from("ops@example.com").unwrap(),
        ));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        let s = subject(cert.der()).expect("parsed");
        assert_eq!(s.common_name.as_deref(), Some("svc-a"));
        assert_eq!(s.dns, vec!["svc-a.internal"]);
        assert_eq!(s.uris, vec!["spiffe://prod/ns/a/sa/svc-a"]);
        assert_eq!(s.emails, vec!["ops@example.com"]);
        assert_eq!(s.primary(), Some("spiffe://prod/ns/a/sa/svc-a"));

        let mut q = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        q.distinguished_name
            .push(rcgen::DnType::CommonName, "only-cn");
        let cert = q.self_signed(&key).unwrap();
        let s = subject(cert.der()).unwrap();
        assert_eq!((s.primary(), s.dns.len()), (Some("only-cn"), 0));
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert_eq!(subject(b""), None);
        assert_eq!(subject(&[0x30, 0x82, 0xff]), None);
        assert_eq!(subject(&[0x30, 0x03, 0x02, 0x01, 0x01]), None);
    }
}
