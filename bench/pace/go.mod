module kvmesh.dev/bench/pace

go 1.22
