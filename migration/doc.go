// Package migration saves, restores and live-migrates a running VM: it turns
// a VM's memory and state into a versioned, checksummed record stream and
// back, over a network connection (pre-copy live migration) or a directory
// (snapshots).
//
// The package never touches KVM itself. A running VM offers itself through
// the small [Source] interface, a VM being built offers [Target]; the VM
// implementation (package kvm's machine, or the pure-Go fake in
// migration/migrationtest) does the ioctls.
//
// # Stream format
//
// Every stream starts with a 20-byte header: the magic "KVMKMIGR", the format
// version (uint32), the stream kind (uint32: source→target, target→source or
// snapshot state file) and a CRC32C of the preceding 16 bytes. Records follow.
// Each record is
//
//	type    uint32   RecordType
//	length  uint32   payload length, capped per type (see maxPayload)
//	hcrc    uint32   CRC32C of type and length
//	payload [length]byte
//	pcrc    uint32   CRC32C of the payload
//
// All integers are little endian. A record whose header or payload checksum
// fails is rejected with a [*ChecksumError] naming the record type and its
// offset; a length above the cap of its type is rejected before anything is
// allocated ([*LimitError]); an unknown type or a record out of order is a
// [*ProtocolError]; a foreign version is a [*VersionError].
//
// # Live migration protocol
//
//	source                                  target
//	header(source) Config          ->
//	                               <-       header(target) Ready | Error
//	Pages... RoundEnd(0)           ->       (full pass, zero pages as markers)
//	                               <-       RoundAck(0) (round applied)
//	Pages... RoundEnd(n)           ->       (pages dirtied since the last round)
//	                               <-       RoundAck(n)
//	-- source pauses vCPUs --
//	Paused                         ->       (target starts its downtime clock)
//	Pages... RoundEnd(final) State Complete ->
//	                               <-       Ack{target downtime, resume time}
//	                                        (sent right after Target.Resume)
//	Done                           ->       (target learns the ack arrived)
//
// The source waits for each RoundAck before deciding on the next round, so
// the bandwidth it measures is end to end (network and target included) and
// no backlog is in flight when it pauses: the estimate of the final pass is
// not fooled by socket buffers or a slow target.
//
// Either side may send Error{message} instead of its next record; the peer
// then fails. Until the source reads the Ack it owns the VM: any failure
// (cancel, timeout, connection drop, target Error) resumes the source and the
// target aborts. See [Migrate] and [Receive].
//
// # Snapshots
//
// A snapshot is a directory with two files: "state" (a snapshot-kind stream:
// SnapshotInfo, Config, [PageBitmap], State, Complete) and "memory". For a
// full snapshot "memory" is the raw image of every RAM region, concatenated
// in region order (each region starts at a page-aligned offset given in
// SnapshotInfo; zero pages are left as holes in a sparse file). For a diff
// snapshot "memory" holds only the pages set in the PageBitmap record, packed
// in bitmap order; it applies on top of its parent, named by ID. See
// [SaveSnapshot], [SaveDiffSnapshot], [LoadSnapshot], [LoadSnapshotChain].
package migration
