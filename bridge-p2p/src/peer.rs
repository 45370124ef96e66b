//! The edge peer: joins the overlay, follows pipes in offset order with catch-up, publishes.
