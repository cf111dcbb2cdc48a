// Connected-component labelling of suprathreshold voxels, one thread per map.
//
// CUDA port of gpuconn.stats.clusters._label_batch (the Numba CPU twin; the
// tests hold this kernel to it). Union-find over the mask's neighbour
// table, using only the neighbours that precede a voxel in C order (the
// first k/2 columns). The root of each component is its smallest voxel
// index, so numbering roots in index order gives raster-order labels, as
// scipy.ndimage.label numbers them. Labels are int32 (a mask has < 2^31
// voxels).
//
// gpuconn_cluster_stat_batch then gives each voxel its cluster's extent or
// mass, summed per map in voxel order in float64 (one thread per map), as
// the twin gpuconn.stats.clusters._cluster_stat_batch does: no atomics, so
// the sums are the same bits on every run and on the CPU. Compiled with
// --fmad=false (gpuconn.backend.NVRTC_OPTIONS).

__device__ __forceinline__ int gpuconn_find_root(int* parent, int v) {
    while (parent[v] != v) {
        parent[v] = parent[parent[v]];
        v = parent[v];
    }
    return v;
}

extern "C" __global__ void gpuconn_label_batch(
    const float* __restrict__ values,  // (n_maps, n_vox)
    const int* __restrict__ table,     // (n_vox, k): neighbours, -1 for none
    float threshold,
    int* parent_all,                   // (n_maps, n_vox) scratch
    int* labels,                       // (n_maps, n_vox) output: 0 background, 1.. clusters
    int* n_labels,                     // (n_maps,) output
    int n_maps, int n_vox, int k)
{
    int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= n_maps) return;
    long long base = (long long)m * (long long)n_vox;
    const float* val = values + base;
    int* parent = parent_all + base;
    int* lab = labels + base;
    int half = k / 2;
    for (int v = 0; v < n_vox; ++v) parent[v] = val[v] > threshold ? v : -1;
    for (int v = 0; v < n_vox; ++v) {
        if (parent[v] < 0) continue;
        for (int j = 0; j < half; ++j) {
            int u = table[(long long)v * k + j];
            if (u < 0 || parent[u] < 0) continue;
            int ru = gpuconn_find_root(parent, u);
            int rv = gpuconn_find_root(parent, v);
            if (ru < rv) parent[rv] = ru;
            else if (rv < ru) parent[ru] = rv;
        }
    }
    int count = 0;
    for (int v = 0; v < n_vox; ++v) {
        if (parent[v] < 0) {
            lab[v] = 0;
        } else if (parent[v] == v) {
            lab[v] = ++count;
        } else {  // the root has a smaller index, so it is already numbered
            lab[v] = lab[gpuconn_find_root(parent, v)];
        }
    }
    n_labels[m] = count;
}

extern "C" __global__ void gpuconn_cluster_stat_batch(
    const float* __restrict__ values,  // (n_maps, n_vox)
    const int* __restrict__ labels,    // (n_maps, n_vox) from gpuconn_label_batch
    const int* __restrict__ n_labels,  // (n_maps,)
    int mass,                          // 0: extent (voxels), 1: mass (sum of the statistic, as randomise -C)
    double* totals_all,                // (n_maps, n_vox + 1) scratch
    double* out,                       // (n_maps, n_vox) output: each voxel's cluster total, 0 outside
    int n_maps, int n_vox)
{
    int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= n_maps) return;
    long long base = (long long)m * (long long)n_vox;
    double* totals = totals_all + (long long)m * ((long long)n_vox + 1);
    const int* lab = labels + base;
    for (int c = 0; c <= n_labels[m]; ++c) totals[c] = 0.0;
    for (int v = 0; v < n_vox; ++v) {
        int c = lab[v];
        if (c > 0) totals[c] += mass ? (double)values[base + v] : 1.0;
    }
    for (int v = 0; v < n_vox; ++v) {
        int c = lab[v];
        out[base + v] = c > 0 ? totals[c] : 0.0;
    }
}
