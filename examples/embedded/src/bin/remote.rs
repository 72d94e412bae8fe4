//! The bundled example functions as a Rust **remote** function server: the same code as the
//! embedded examples, served over StateFun's request-reply protocol under the namespace `rs`
//! (`rs/greeter`, `rs/counter`, `rs/cart`, …; the cart still reserves items from the node's
//! `example/stock`).
//!
//! Usage: statemesh-remote-example [ADDR]     (default 127.0.0.1:8000)

use statemesh_sdk::server::FunctionServer;
use statemesh_sdk::TypeName;

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8000".to_string());
    let mut server = FunctionServer::new();
    for (typ, f) in statemesh_examples::all() {
        let remote = TypeName::new("rs", typ.name()).expect("valid type");
        server = server.function_arc(remote, f);
    }
    let listener = std::net::TcpListener::bind(&addr)?;
    println!("serving on {}", listener.local_addr()?.port());
    actix_web::rt::System::new().block_on(server.serve_listener(listener))
}
