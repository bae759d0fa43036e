"""The relay that carries streamed answers from workers back to the clients waiting for them.

Parsl and Globus Compute return a task's result whole, so a worker pushes a streamed answer through a separate
door: one HTTP request to ``POST /resource_server/internal/streams/{stream_id}`` whose body is the model server's
event stream, written as it is produced. The gateway that waits for the stream opened it (``Relay.open``) and
reads the events from its ``Inbox``; the route hands the body to ``Relay.receive``. In one process the events go
through a queue; with several replicas the request may reach another replica, and the events go through Redis.
"""
