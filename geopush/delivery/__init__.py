"""Delivery: decided pushes from the durable outbox to phones (contract §7).

`outbox` (the entry written in the device's commit, and the pure rules of its life), `senders`
(log, fcm, webhook behind one small interface), `worker` (claims due entries, sends, records),
`report` (the delivery report and stats).
"""
