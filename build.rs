//! The migrations are compiled into the binary (`embed_migrations!`); a new or edited migration must rebuild it.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
