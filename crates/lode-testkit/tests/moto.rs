//! The moto helper starts a real server that answers, and turns IAM enforcement on.

#[test]
fn moto_starts_and_enforces_iam() {
    let Some(moto) = lode_testkit::Moto::start() else {
        return;
    };
    assert!(moto.endpoint().ends_with(&moto.port().to_string()));
    moto.enforce_iam();
}
