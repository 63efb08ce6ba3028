//! Checks that the checked-in generated code matches the `.proto` files.

use std::path::Path;

const PROTOS: [&str; 3] = [
    "ghx/v1/common.proto",
    "ghx/v1/node.proto",
    "ghx/v1/coordinator.proto",
];

#[test]
fn generated_code_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let descriptors = protox::compile(PROTOS, [root]).expect("the .proto files compile");
    let out = tempfile::tempdir().expect("temporary directory");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(out.path())
        .compile_fds(descriptors)
        .expect("code generation succeeds");
    let fresh = std::fs::read_to_string(out.path().join("ghx.v1.rs")).expect("generated file");
    let checked_in_path = root.join("src/gen/ghx.v1.rs");
    if std::env::var_os("GHX_UPDATE_PROTO").is_some() {
        std::fs::write(&checked_in_path, &fresh).expect("write generated code");
        return;
    }
    let checked_in = std::fs::read_to_string(&checked_in_path).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "proto/src/gen/ghx.v1.rs is out of date with the .proto files; \
         rerun this test with GHX_UPDATE_PROTO=1 and commit the result"
    );
}
