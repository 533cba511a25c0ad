// Command tlogcheck verifies a node's log as any tlog-tiles client would: with Go's
// golang.org/x/mod/sumdb/note (the checkpoint's signature) and sumdb/tlog (tiles checked
// against the signed root by TileHashReader, inclusion proofs of the entry bundles'
// records). It reads nothing but the log's tlog-tiles prefix.
//
// Usage: tlogcheck PREFIX_URL VKEY
//
// It prints one JSON line {"origin","size","root","records","tiles"} and exits 0 if
// everything verifies, or prints the problem and exits 1.
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

const tileHeight = 8

// tiles fetches tiles from the node; Go names them tile/8/L/N, the C2SP path is tile/L/N.
type tiles struct {
	prefix  string
	fetched int
	cache   map[string][]byte
}

func (t *tiles) Height() int { return tileHeight }

func (t *tiles) ReadTiles(list []tlog.Tile) ([][]byte, error) {
	out := make([][]byte, len(list))
	for i, tile := range list {
		goPath := tile.Path() // tile/8/L/N[.p/W]
		c2spPath := "tile/" + strings.SplitN(goPath, "/", 3)[2]
		data, ok := t.cache[c2spPath]
		if !ok {
			var err error
			if data, err = get(t.prefix + "/" + c2spPath); err != nil {
				return nil, err
			}
			t.fetched++
			t.cache[c2spPath] = data
		}
		out[i] = data
	}
	return out, nil
}

func (t *tiles) SaveTiles([]tlog.Tile, [][]byte) {}

func get(url string) ([]byte, error) {
	response, err := http.Get(url)
	if err != nil {
		return nil, err
	}
	defer response.Body.Close()
	body, err := io.ReadAll(response.Body)
	if err != nil {
		return nil, err
	}
	if response.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %d %s", url, response.StatusCode, body)
	}
	return body, nil
}

// bundle splits a tlog-tiles entry bundle: big-endian uint16 length, then the entry.
func bundle(data []byte) ([][]byte, error) {
	var entries [][]byte
	for len(data) > 0 {
		if len(data) < 2 {
			return nil, fmt.Errorf("entry bundle ends inside a length")
		}
		n := int(binary.BigEndian.Uint16(data))
		if len(data) < 2+n {
			return nil, fmt.Errorf("entry bundle ends inside an entry")
		}
		entries = append(entries, data[2:2+n])
		data = data[2+n:]
	}
	return entries, nil
}

func entriesPath(n int64, width int64) string {
	// The data tile's path is Go's with "entries" for its level.
	tile := tlog.Tile{H: tileHeight, L: 0, N: n, W: int(width)}
	return "tile/entries/" + strings.SplitN(tile.Path(), "/", 4)[3]
}

func check(prefix, vkey string) (map[string]any, error) {
	verifier, err := note.NewVerifier(vkey)
	if err != nil {
		return nil, fmt.Errorf("vkey: %v", err)
	}
	text, err := get(prefix + "/checkpoint")
	if err != nil {
		return nil, err
	}
	opened, err := note.Open(text, note.VerifierList(verifier))
	if err != nil {
		return nil, fmt.Errorf("checkpoint note: %v", err)
	}
	lines := strings.Split(opened.Text, "\n")
	if len(lines) < 4 || lines[0] != verifier.Name() {
		return nil, fmt.Errorf("checkpoint body %q", opened.Text)
	}
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil {
		return nil, fmt.Errorf("checkpoint size: %v", err)
	}
	root, err := tlog.ParseHash(lines[2])
	if err != nil {
		return nil, fmt.Errorf("checkpoint root: %v", err)
	}
	reader := &tiles{prefix: prefix, cache: map[string][]byte{}}
	hashes := tlog.TileHashReader(tlog.Tree{N: size, Hash: root}, reader)
	computed, err := tlog.TreeHash(size, hashes)
	if err != nil {
		return nil, fmt.Errorf("tree hash from tiles: %v", err)
	}
	if computed != root {
		return nil, fmt.Errorf("tiles give root %v, checkpoint says %v", computed, root)
	}
	records := int64(0)
	for n := int64(0); n*256 < size; n++ {
		width := size - n*256
		if width > 256 {
			width = 256
		}
		data, err := get(prefix + "/" + entriesPath(n, width))
		if err != nil {
			return nil, err
		}
		entries, err := bundle(data)
		if err != nil {
			return nil, err
		}
		if int64(len(entries)) != width {
			return nil, fmt.Errorf("bundle %d holds %d entries, not %d", n, len(entries), width)
		}
		// Every record's hash is the level-0 hash the verified tiles hold for it.
		indexes := make([]int64, len(entries))
		for i := range entries {
			indexes[i] = tlog.StoredHashIndex(0, n*256+int64(i))
		}
		stored, err := hashes.ReadHashes(indexes)
		if err != nil {
			return nil, fmt.Errorf("read record hashes of bundle %d: %v", n, err)
		}
		for i, entry := range entries {
			index := n*256 + int64(i)
			if tlog.RecordHash(entry) != stored[i] {
				return nil, fmt.Errorf("record %d does not hash to its tile hash", index)
			}
			records++
		}
		// And an inclusion proof built from tiles checks for the bundle's edges.
		for _, index := range []int64{n * 256, n*256 + width - 1} {
			proof, err := tlog.ProveRecord(size, index, hashes)
			if err != nil {
				return nil, fmt.Errorf("prove record %d: %v", index, err)
			}
			if err := tlog.CheckRecord(proof, size, root, index, stored[index-n*256]); err != nil {
				return nil, fmt.Errorf("record %d: %v", index, err)
			}
		}
	}
	if size > 1 {
		// A consistency proof built from tiles: the tree at half the size is a prefix.
		old := size / 2
		oldHash, err := tlog.TreeHash(old, hashes)
		if err != nil {
			return nil, err
		}
		proof, err := tlog.ProveTree(size, old, hashes)
		if err != nil {
			return nil, err
		}
		if err := tlog.CheckTree(proof, size, root, old, oldHash); err != nil {
			return nil, fmt.Errorf("consistency %d -> %d: %v", old, size, err)
		}
	}
	return map[string]any{
		"origin":  lines[0],
		"size":    size,
		"root":    base64.StdEncoding.EncodeToString(root[:]),
		"records": records,
		"tiles":   reader.fetched,
	}, nil
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: tlogcheck PREFIX_URL VKEY")
		os.Exit(2)
	}
	result, err := check(strings.TrimSuffix(os.Args[1], "/"), os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, "tlogcheck:", err)
		os.Exit(1)
	}
	var out bytes.Buffer
	_ = json.NewEncoder(&out).Encode(result)
	os.Stdout.Write(out.Bytes())
}
