//! Test certificates made by `openssl`: a CA and certificates it signs.

use std::path::Path;
use std::time::Duration;

use crate::run;

const T: Duration = Duration::from_secs(15);

fn openssl(dir: &Path, args: &[&str]) {
    let r = run("openssl", args, T);
    assert_eq!(
        r.code,
        Some(0),
        "openssl {args:?} in {}: {r:?}",
        dir.display()
    );
}

/// A CA, a server certificate for 127.0.0.1 signed by it, and a client certificate.
pub fn make_pki(dir: &Path) {
    let p = |name: &str| dir.join(name).to_str().expect("utf-8").to_owned();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=FlockMQ test CA",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.pem"),
        ],
    );
    issue(
        dir,
        "server",
        "127.0.0.1",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    );
    issue(dir, "client", "robot-7", "extendedKeyUsage=clientAuth\n");
}

/// `{name}.pem` and `{name}.key` for `cn`, signed by the CA in `dir`, with the
/// extensions in `ext` (openssl's extfile syntax).
pub fn issue(dir: &Path, name: &str, cn: &str, ext: &str) {
    let p = |name: &str| dir.join(name).to_str().expect("utf-8").to_owned();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &p(&format!("{name}.key")),
            "-out",
            &p(&format!("{name}.csr")),
        ],
    );
    let ext_file = dir.join(format!("{name}.ext"));
    std::fs::write(&ext_file, ext).expect("ext file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &p(&format!("{name}.csr")),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext_file.to_str().expect("utf-8"),
            "-out",
            &p(&format!("{name}.pem")),
        ],
    );
}
